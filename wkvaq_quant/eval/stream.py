"""Block-streamed perplexity (`main.py --stream_blocks`): a (fake-)quantized model evaluated with one
decoder block in memory at a time, read from the checkpoint's safetensors shards.

1. The model is built on the meta device (no memory). The modules before the blocks (embeddings,
   rotary embedding) are read, and one forward per batch of windows runs with every decoder block
   replaced by a pass-through that records its arguments: block 0's hidden states, and the keyword
   arguments the model gives each block (masks, position embeddings: per block, so families with
   per-layer masks or rotary embeddings get theirs). Arguments equal across batches are kept once.
   Those modules go back to meta.
2. Per block: its tensors are read (`SafetensorsCheckpoint`), converted to the run's dtype, moved to
   the device, its weights fake-quantized (RTN, `quantize_block_weights`, the same call `attach`
   makes in memory), and every batch runs through it; its outputs replace the hidden states. The
   quantization hooks (activations, Q / K / V / P, KV cache settings, per-block maps) are attached
   once, on the meta model, exactly as in memory. The block goes back to meta.
3. The final norm and the head are read (not the input embeddings, unless tied to the head), and
   for each batch the model's own forward runs once more, on placeholder input embeddings, with
   the blocks replaced by a pass-through that hands over the last block's outputs: norm, head and
   whatever the family does after them run as in memory, one batch of logits at a time, and the
   NLL is summed by the same `PerplexityMeter` as in memory.

So every block sees the tensors it sees in memory, in the same shapes, and on CPU the perplexity
is bit-identical to the in-memory run's (tested). On CUDA the next block is read into pinned
memory by a thread and copied on a second stream while the current one runs.

With `offload_dir` the hidden states live in files (one batch in memory at a time), and after each
block a state file records the finished block, so a killed run resumes with the next block.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from wkvaq_quant.eval.ppl import PerplexityMeter, PerplexityResult, check_windows
from wkvaq_quant.models import _pretrained_path
from wkvaq_quant.modeling.attach import attach, quantize_block_weights
from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.results import atomic_write_json
from wkvaq_quant.weights.blocks import block_output, move_tensors, outside_modules
from wkvaq_quant.weights.layerwise import (SafetensorsCheckpoint, _assign_block, _block_tensor_names, _copy_specs,
                                           _read_outside, _release_block, _release_outside, _skeleton, module_keys,
                                           read_converted)

__all__ = ["STREAM_STATE", "StreamBatch", "check_streamable", "refuse_hub", "stream_perplexity"]

FLAG = "--stream_blocks"
STREAM_STATE = "stream_state.json"
"""In the offload directory: the settings and the last finished block of an offloaded run."""


def refuse_hub(source) -> None:
    """A hub id is refused: streaming reads local shards (a download would defeat it)."""
    if source.kind == "hub":
        raise ValueError(f"{FLAG} --model {source.path}: reads a local checkpoint's safetensors shards; download "
                         f"the hub model first (huggingface-cli download {source.path} --local-dir DIR) and pass "
                         f"--model DIR")


def check_streamable(source) -> SafetensorsCheckpoint:
    """The checkpoint of a resolved `--model` (models.ModelSource) that --stream_blocks can read:
    a local directory (or a registry model) of safetensors shards, all present; refused otherwise,
    from the headers alone."""
    refuse_hub(source)
    return SafetensorsCheckpoint(_pretrained_path(source), what=FLAG)


def _check_tensors(sk, ckpt: SafetensorsCheckpoint) -> None:
    """Every tensor the model needs is in the shards with the shape its config gives (the head may
    be tied to the embeddings); refused before any is read."""
    model = sk.model
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = module_keys(model, model.get_output_embeddings()) if tied else set()
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items() if k not in head}
    _copy_specs(ckpt, list(shapes), torch.float32, shapes)  # the checks only (each name present, its shape)


@dataclass
class StreamBatch:
    """One forward's windows: `ids` [bs, seq_len] of dataset `name`."""

    name: str
    ids: Tensor


class _Done(Exception):
    """Ends a recording forward once the last block's arguments are recorded."""


@contextmanager
def _blocks_replaced(blocks: list[nn.Module], fn: Callable[..., Tensor]) -> Iterator[None]:
    """Every decoder block's forward replaced by `fn(i, hidden, kwargs)` (the block's index, its
    hidden-state input, its keyword arguments); restored afterwards."""
    def replacement(i: int):
        def forward(*args, **kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            return fn(i, hidden, kwargs)
        return forward

    for i, block in enumerate(blocks):
        block.forward = replacement(i)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


class _Shared:
    """Keeps one copy of equal tensors: arguments that are the same for every batch (the causal
    mask, the position embeddings of windows of one length) are stored once."""

    def __init__(self) -> None:
        self.kept: list[Tensor] = []

    def __call__(self, obj: Any) -> Any:
        if isinstance(obj, Tensor):
            if any(t is obj for t in self.kept):  # the same object (every block of one forward)
                return obj
            for t in self.kept:  # an equal one (another batch)
                if t.shape == obj.shape and t.dtype == obj.dtype and t.device == obj.device and torch.equal(t, obj):
                    return t
            self.kept.append(obj)
            return obj
        if isinstance(obj, tuple):
            return tuple(self(o) for o in obj)
        if isinstance(obj, list):
            return [self(o) for o in obj]
        if isinstance(obj, dict):
            return {k: self(v) for k, v in obj.items()}
        return obj


@torch.no_grad()
def _record_inputs(model: nn.Module, blocks: list[nn.Module], batches: list[StreamBatch], device: torch.device,
                   put: Callable[[Tensor], None] | None) -> list[list[dict[str, Any]]]:
    """Per batch the keyword arguments of every block; block 0's hidden states go to `put`."""
    share, kwargs = _Shared(), []
    current: list[dict[str, Any]] = []
    returned: list[Tensor] = []  # what the previous block handed on

    def record(i: int, hidden: Tensor, kw: dict[str, Any]) -> Tensor:
        if i == 0 and put is not None:
            put(hidden)
        if i > 0 and hidden is not returned[0]:  # the model changed the hidden states between two blocks
            raise ValueError(f"{FLAG}: {type(model).__name__} changes the hidden states between decoder blocks "
                             f"{i - 1} and {i}, which block-by-block evaluation does not reproduce; allowed: the "
                             f"evaluation in memory (without {FLAG})")
        returned[:] = [hidden]
        current.append(share(kw))
        if i == len(blocks) - 1:
            raise _Done
        return hidden

    with _blocks_replaced(blocks, record):
        for batch in batches:
            current = []
            try:
                model(input_ids=batch.ids.to(device), use_cache=False)
            except _Done:
                kwargs.append(current)
                continue
            raise RuntimeError("the forward pass never reached the last decoder block")
    return kwargs


class _Hidden:
    """The hidden states of every batch between blocks: in memory, or one file per batch under
    `directory` (a generation directory per block; `get` reads one back)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.items: list[Tensor | Path] = []

    def put(self, h: Tensor) -> None:
        if self.directory is None:
            self.items.append(h)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{len(self.items):06d}.pt"
        torch.save(h.detach().to("cpu").contiguous(), path)
        self.items.append(path)

    def get(self, j: int, device: torch.device) -> Tensor:
        h = self.items[j]
        return (torch.load(h, weights_only=True) if isinstance(h, Path) else h).to(device)

    @classmethod
    def existing(cls, directory: Path, n: int) -> _Hidden:
        hidden = cls(directory)
        hidden.items = [directory / f"{j:06d}.pt" for j in range(n)]
        missing = [p.name for p in hidden.items if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{directory}: {len(missing)} of {n} batch files missing")
        return hidden


class _Reader:
    """Block tensors read from the checkpoint, converted to `dtype`; on CUDA the next block is read
    by a thread into pinned memory and copied on a second stream while the current block runs."""

    def __init__(self, sk, ckpt: SafetensorsCheckpoint, dtype: torch.dtype, device: torch.device) -> None:
        self.sk, self.ckpt, self.dtype, self.device = sk, ckpt, dtype, device
        self.cuda = device.type == "cuda"
        self.pool = ThreadPoolExecutor(1) if self.cuda else None
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.ahead: dict[int, Future] = {}

    def _read(self, i: int) -> dict[str, Tensor]:
        out = {}
        for name in _block_tensor_names(self.sk, i):
            t = read_converted(self.ckpt.entry(name), self.dtype)
            if self.cuda:
                t = t.pin_memory()
                with torch.cuda.stream(self.stream):
                    t = t.to(self.device, non_blocking=True)
            out[name] = t
        if self.cuda:
            event = torch.cuda.Event()
            event.record(self.stream)
            return {"__event__": event, **out}
        return out

    def prefetch(self, i: int) -> None:
        if self.pool is not None and 0 <= i < len(self.sk.blocks) and i not in self.ahead:
            self.ahead[i] = self.pool.submit(self._read, i)

    def block(self, i: int) -> dict[str, Tensor]:
        tensors = self.ahead.pop(i).result() if i in self.ahead else self._read(i)
        event = tensors.pop("__event__", None)
        if event is not None:  # copied on the side stream: the compute stream waits, and owns the memory
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in tensors.values():
                t.record_stream(current)
        return tensors  # on the device already (read there on CPU, copied on CUDA)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _state_settings(settings: dict[str, Any], batches: list[StreamBatch]) -> dict[str, Any]:
    return {**settings, "batches": [[b.name, list(b.ids.shape)] for b in batches]}


def _resume(offload_dir: Path | None, settings: dict[str, Any], log: Callable[[str], None]) -> tuple[int, Path | None]:
    """(blocks already done, their outputs' generation directory) of an offloaded run of the same
    settings in `offload_dir`; (0, None) for a new run. Other settings, or a damaged state, start over."""
    if offload_dir is None or not (offload_dir / STREAM_STATE).is_file():
        return 0, None
    try:
        state = json.loads((offload_dir / STREAM_STATE).read_text())
        gen = offload_dir / state["generation"]
        done = int(state["blocks_done"])
        if state.get("settings") != settings:
            log(f"[wkvaq] {offload_dir}: an offloaded run of other settings; starting over")
            return 0, None
        _Hidden.existing(gen, len(settings["batches"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        log(f"[wkvaq] {offload_dir}: its offloaded state is not usable ({err}); starting over")
        return 0, None
    log(f"[wkvaq] {offload_dir}: resuming after block {done - 1} (outputs kept in {gen.name})")
    return done, gen


def _clean(offload_dir: Path, keep: Path | None) -> None:
    """Remove every generation directory in `offload_dir` but `keep`."""
    for p in offload_dir.glob("block-*"):
        if p != keep:
            shutil.rmtree(p, ignore_errors=True)


@torch.no_grad()
def stream_perplexity(checkpoint: str | Path, plan: QuantPlan, batches: list[StreamBatch], windows: dict[str, int],
                      dtype: torch.dtype = torch.float32, device: str = "cpu", attn_implementation: str = "sdpa",
                      trust_remote_code: bool = False, progress: bool = True, offload_dir: Path | None = None,
                      settings: dict[str, Any] | None = None,
                      log: Callable[[str], None] = print) -> dict[str, PerplexityResult]:
    """Perplexity per dataset of the checkpoint in `checkpoint` under `plan` (see the module
    docstring), block by block. `batches`: the forwards in order, each of one dataset;
    `windows`: windows per dataset. `offload_dir`: hidden states in files there, resumable
    (`settings` identify the run; a state of other settings is discarded)."""
    for b in batches:
        check_windows(b.ids, b.ids.shape[0])
    ckpt = SafetensorsCheckpoint(checkpoint, what=FLAG)
    sk = _skeleton(ckpt, trust_remote_code, attn_implementation)
    _check_tensors(sk, ckpt)
    model, blocks = sk.model, sk.blocks
    if plan.layers is not None:
        plan.layers.check_depth(len(blocks))
    dev = torch.device(device)
    state_settings = _state_settings(settings or {}, batches)
    start, gen = _resume(offload_dir, state_settings, log)
    if offload_dir is not None:
        offload_dir.mkdir(parents=True, exist_ok=True)
        _clean(offload_dir, gen)
    # the quantization hooks and attention function, before anything runs: the masks the model
    # builds depend on the attention implementation attach selects
    attach(model, plan, keep_originals=False, weights=False)
    # 1. inputs of every block (block 0's hidden states only when not resuming)
    started = time.perf_counter()
    hidden = (_Hidden.existing(gen, len(batches)) if gen is not None
              else _Hidden(None if offload_dir is None else offload_dir / "block-input"))
    _read_outside(sk, ckpt, dtype)
    _outside_to(sk, dev)
    kwargs = _record_inputs(model, blocks, batches, dev, hidden.put if gen is None else None)
    _release_outside(sk)
    _trim()
    # 2. the blocks, one at a time
    reader = _Reader(sk, ckpt, dtype, dev)
    try:
        bar = tqdm(range(start, len(blocks)), desc="stream blocks", unit="block", disable=not progress,
                   dynamic_ncols=True, initial=start, total=len(blocks))
        for i in bar:
            _assign_block(sk, i, reader.block(i))
            reader.prefetch(i + 1)
            quantize_block_weights(model, plan, i)
            out = _Hidden(None if offload_dir is None else offload_dir / f"block-{i:05d}")
            for j in range(len(batches)):
                out.put(block_output(blocks[i](hidden.get(j, dev), **move_tensors(kwargs[j][i], dev))))
            _release_block(sk, i)
            hidden = out
            _trim()
            if offload_dir is not None:
                atomic_write_json(offload_dir / STREAM_STATE, {"settings": state_settings, "blocks_done": i + 1,
                                                               "generation": out.directory.name})
                _clean(offload_dir, out.directory)
    finally:
        reader.close()
    # 3. final norm and head, one batch at a time, through the model's own forward
    _read_outside(sk, ckpt, dtype, head=True, embeddings=False)  # the embeddings' output is not used
    _outside_to(sk, dev)
    width = model.get_input_embeddings().weight.shape[1]
    meters = {name: PerplexityMeter(n, next(b.ids.shape[1] for b in batches if b.name == name), desc=name,
                                    progress=progress) for name, n in windows.items()}
    last: list[Tensor] = []
    with _blocks_replaced(blocks, lambda i, h, kw: last[0] if i == 0 else h):
        for j, batch in enumerate(batches):
            last[:] = [hidden.get(j, dev)]
            ids = batch.ids.to(dev)
            embeds = torch.zeros(*ids.shape, width, dtype=dtype, device=dev)  # replaced by the blocks' output
            meters[batch.name].add(model(inputs_embeds=embeds, use_cache=False).logits, ids)
    _release_outside(sk)
    seconds = time.perf_counter() - started  # the whole pass, shared by the datasets it carried
    results = {name: m.result(seconds) for name, m in meters.items()}
    if offload_dir is not None:
        shutil.rmtree(offload_dir, ignore_errors=True)
    return results


def _trim() -> None:
    """Give freed heap memory back to the system (glibc keeps the freed blocks' pages otherwise, and
    the process would grow by a block's worth over the run); a no-op without glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _outside_to(sk, device: torch.device) -> None:
    """The modules outside the blocks that were read, on `device`."""
    for m in outside_modules(sk.model, sk.blocks):
        m.to(device)
