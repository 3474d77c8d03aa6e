"""Block-by-block runner: capture the inputs of decoder block 0, then visit the blocks in
order with one block on the compute device at a time (GPTQ's `llama_sequential`, modern form).

The inputs of block 0 are captured by a forward pre-hook registered with `with_kwargs=True`
on the real block, so every keyword the model passes (`position_embeddings`,
`attention_mask`, `position_ids`, `cache_position`, ...) is kept as given; the forward stops
there, so later blocks and the head never run. A decoder block returns a Tensor in
transformers 5 (a tuple in older versions; its first element is taken).
"""

from __future__ import annotations

import contextvars
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from wkvaq_quant.modeling.attach import decoder_blocks

__all__ = ["NEXT_INPUTS", "BlockInputs", "PausedForwards", "advance_block", "block_output", "capture_block_inputs",
           "for_each_block", "forward_block", "move_tensors", "outside_modules", "run_block"]

NEXT_INPUTS = ("quantized", "fp")
"""What block i+1 sees: the outputs of block i after `process` changed it ("quantized", errors
propagate as in llm-compressor) or before ("fp", every block sees full-precision inputs)."""


class _Captured(Exception):
    """Raised by the capture hook to end the forward pass once block 0's inputs are recorded."""


def move_tensors(obj: Any, device: torch.device | str) -> Any:
    """`obj` with every tensor inside (tuples, lists, dicts) moved to `device`."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_tensors(o, device) for o in obj)
    if isinstance(obj, list):
        return [move_tensors(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move_tensors(v, device) for k, v in obj.items()}
    return obj


@dataclass
class BlockInputs:
    """Inputs of one decoder block for every calibration batch.

    hidden: per batch the hidden states [b, T, D]: a Tensor on `store_device`, or, when the
            activations are offloaded, the Path of a file holding it (`offload_dir`).
    kwargs: per batch the keyword arguments the model passed to the block (masks,
            position embeddings, ...), unchanged from block to block.
    offload_dir: when set, hidden states live in files under it, one batch in memory at a time
            (--offload_activations); every `with_hidden` writes a new subdirectory.
    """

    hidden: list[Tensor | Path]
    kwargs: list[dict[str, Any]]
    store_device: torch.device
    offload_dir: Path | None = None

    def __post_init__(self) -> None:
        if len(self.hidden) != len(self.kwargs):
            raise ValueError(f"BlockInputs: {len(self.hidden)} hidden batches but {len(self.kwargs)} kwargs")

    def batches(self, device: torch.device | str) -> Iterator[tuple[Tensor, dict[str, Any]]]:
        """(hidden, kwargs) per batch, on `device`."""
        for h, kw in zip(self.hidden, self.kwargs):
            if isinstance(h, Path):
                h = torch.load(h, weights_only=True)
            yield h.to(device), move_tensors(kw, device)

    def with_hidden(self, hidden: Iterable[Tensor]) -> BlockInputs:
        """The same batches with new hidden states (consumed one at a time: offloaded ones go to
        disk as they come)."""
        put = _sink(self.store_device, self.offload_dir)
        return BlockInputs([put(h) for h in hidden], self.kwargs, self.store_device, self.offload_dir)

    def discard(self) -> None:
        """Remove this generation's offloaded files (nothing to do in memory)."""
        dirs = {h.parent for h in self.hidden if isinstance(h, Path)}
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def _sink(store: torch.device, offload_dir: Path | None) -> Callable[[Tensor], Tensor | Path]:
    """Where a new set of hidden states goes, batch by batch: `store` (in memory), or a new
    generation of files under `offload_dir`."""
    if offload_dir is None:
        return lambda h: h.detach().to(store)
    return _Generation(offload_dir).put


class _Generation:
    """A new subdirectory of `offload_dir` holding one file per batch of hidden states."""

    def __init__(self, offload_dir: Path) -> None:
        offload_dir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="hidden-", dir=offload_dir))
        self.count = 0

    def put(self, h: Tensor) -> Path:
        path = self.dir / f"{self.count:06d}.pt"
        torch.save(h.detach().to("cpu").contiguous(), path)
        self.count += 1
        return path


def block_output(out: Any) -> Tensor:
    """The hidden states a decoder block returned (a Tensor, or the first element of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def outside_modules(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """Leaf-most modules holding parameters or buffers outside the decoder blocks (embeddings,
    rotary embedding, final norm, head), unless they are on the meta device."""
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    out = []
    for m in model.modules():
        if id(m) in in_blocks:
            continue
        direct = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        if direct and not all(t.is_meta for t in direct):
            out.append(m)
    return out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: Tensor, device: torch.device | str = "cpu",
                         batch_size: int = 1, store_device: torch.device | str | None = None,
                         offload_dir: Path | None = None) -> BlockInputs:
    """Run the model on `input_ids` [n, T] in batches up to decoder block 0 and record its inputs
    (hidden states in files under `offload_dir` when given, see BlockInputs).

    Only the modules outside the decoder blocks (embeddings, rotary embedding) move to `device`;
    they go back to where they were afterwards. Modules left on the meta device (a head a
    layer-wise run never reads) stay there: the forward stops before them.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be [n_samples, seq_len] with n_samples > 0, got {tuple(input_ids.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device)
    store = torch.device(store_device) if store_device is not None else device
    blocks = decoder_blocks(model)
    outside = outside_modules(model, blocks)
    homes = [next(iter(list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))).device for m in outside]
    hidden: list[Tensor | Path] = []
    kwargs: list[dict[str, Any]] = []
    put = _sink(store, offload_dir)

    def hook(_mod: nn.Module, args: tuple, kw: dict) -> None:
        kw = dict(kw)
        h = args[0] if args else kw.pop("hidden_states")
        hidden.append(put(h))
        kwargs.append(move_tensors({k: v for k, v in kw.items()}, store))
        raise _Captured

    for m in outside:
        m.to(device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[i: i + batch_size].to(device), use_cache=False)
            except _Captured:
                continue
            raise RuntimeError("the forward pass never reached decoder block 0")
    finally:
        handle.remove()
        for m, home in zip(outside, homes):
            m.to(home)
    return BlockInputs(hidden, kwargs, store, offload_dir)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, device: torch.device | str) -> BlockInputs:
    """The block's outputs for every batch of `inputs`, as the inputs of the next block."""
    return inputs.with_hidden(block_output(block(h, **kw)) for h, kw in inputs.batches(device))


@torch.no_grad()
def forward_block(block: nn.Module, inputs: BlockInputs, device: torch.device | str) -> None:
    """Run the block over every batch of `inputs`, keeping nothing (for hooks that record)."""
    for h, kw in inputs.batches(device):
        block(h, **kw)


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def for_each_block(model: nn.Module, inputs: BlockInputs,
                   process: Callable[[int, nn.Module, BlockInputs], BlockInputs | None],
                   device: torch.device | str = "cpu", next_inputs: str = "quantized", progress: bool = True,
                   desc: str = "blocks", fp_outputs_from_process: bool = False) -> BlockInputs:
    """Call `process(i, block, inputs_of_block_i)` for every decoder block in order, with that block
    (alone) moved to `device`; returns the inputs the block after the last would see.

    `process` may change the block in place (quantize, scale, clip) and may return the block's
    outputs (see advance_block). `next_inputs` picks what the following block sees (see NEXT_INPUTS).
    """
    if next_inputs not in NEXT_INPUTS:
        raise ValueError(f"next_inputs={next_inputs!r}: allowed: {', '.join(NEXT_INPUTS)}")
    for i, block in enumerate(tqdm(decoder_blocks(model), desc=desc, disable=not progress)):
        home = _device_of(block)
        block.to(device)
        inputs = advance_block(block, i, inputs, process, device, next_inputs, fp_outputs_from_process)
        block.to(home)
    return inputs


def advance_block(block: nn.Module, index: int, inputs: BlockInputs,
                  process: Callable[[int, nn.Module, BlockInputs], BlockInputs | None], device: torch.device | str,
                  next_inputs: str, fp_outputs_from_process: bool = False) -> BlockInputs:
    """`process(index, block, inputs)`, then the inputs of the next block: the outputs of the block
    as `process` left it ("quantized") or as it was before ("fp"). The old inputs are discarded.

    `process` may return the block's outputs on `inputs` as it leaves the block (GPTQ's single
    pass computes them on the way); they are used instead of running the block once more. With
    `fp_outputs_from_process` it returns, and must, the outputs of the block before it changed it
    (AWQ records them in the forward it runs anyway); they are the "fp" next inputs."""
    if fp_outputs_from_process:
        if next_inputs != "fp":
            raise ValueError("fp_outputs_from_process needs next_inputs='fp'")
        produced = process(index, block, inputs)
        if produced is None:
            raise RuntimeError(f"block {index}: process returned no full-precision outputs")
        inputs.discard()
        return produced
    fp_out = run_block(block, inputs, device) if next_inputs == "fp" else None
    produced = process(index, block, inputs)
    if fp_out is not None:
        out = fp_out
        if produced is not None:
            produced.discard()
    else:
        out = produced if produced is not None else run_block(block, inputs, device)
    inputs.discard()
    return out


class _Abort(BaseException):
    """Raised inside a paused forward to unwind it when PausedForwards closes early."""


_FINISH = object()  # command: run the forward to its end


class PausedForwards:
    """The forward of `block` over every batch of `inputs`, each in a thread of its own that stops
    at the input of a chosen module until told to go on: work can be done between two stages of
    the block while every batch waits at the same point (GPTQ's single pass: quantize q/k/v once
    every batch has computed their input, then let the batches go on to o_proj's input with the
    quantized q/k/v, ...). The batches keep their intermediate activations while they wait.

    Exactly one thread computes at any time (the caller waits while a batch runs, a batch waits
    while paused) and batches run in order, so every tensor equals the one a plain forward of
    the batch computes. Use as a context manager: leaving it early unwinds the waiting forwards.
    """

    def __init__(self, block: nn.Module, inputs: BlockInputs, device: torch.device | str) -> None:
        if inputs.offload_dir is not None:
            raise ValueError("PausedForwards holds every batch's activations in memory; the inputs are offloaded "
                             "to disk (--offload_activations)")
        self.block = block
        self._batches = inputs.batches(device)
        self._n = len(inputs.hidden)
        self._local = threading.local()
        self._reports: queue.Queue = queue.Queue()
        self._commands: list[queue.Queue] = []
        self._threads: list[threading.Thread] = []
        self._live: set[int] = set()
        self._hooked: dict[int, Any] = {}

    @property
    def batch(self) -> int | None:
        """The batch whose forward runs in the calling thread (None outside the forwards)."""
        return getattr(self._local, "batch", None)

    def run_to(self, module: nn.Module) -> list[Tensor]:
        """Let every batch run on until `module` is called; returns each batch's input to it
        (positional argument 0), in batch order."""
        if id(module) not in self._hooked:
            self._hooked[id(module)] = module.register_forward_pre_hook(self._pre_hook)
        xs = []
        for b in range(self._n):
            kind, value = self._resume(b, module)
            if kind != "paused":
                raise RuntimeError(f"the forward of calibration batch {b} ended without calling "
                                   f"{type(module).__name__} (a module the block never calls for it)")
            xs.append(value)
        return xs

    def finish(self) -> list[Tensor]:
        """Run every batch's forward to its end; returns the block's outputs in batch order."""
        outs = []
        for b in range(self._n):
            kind, value = self._resume(b, _FINISH)
            outs.append(value)
        self.close()
        return outs

    def close(self) -> None:
        """Unwind the forwards still waiting, join every thread, remove the hooks."""
        for b in self._live:
            self._commands[b].put(None)
        while self._live:  # a forward still running reports once more (paused) before it unwinds
            kind, b, _ = self._reports.get()
            if kind != "paused":
                self._live.discard(b)
        for t in self._threads:
            t.join()
        for h in self._hooked.values():
            h.remove()
        self._hooked.clear()

    def __enter__(self) -> PausedForwards:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _resume(self, b: int, target: Any) -> tuple[str, Any]:
        if b == len(self._threads):  # start batch b's forward
            h, kw = next(self._batches)
            self._commands.append(queue.Queue())
            ctx = contextvars.copy_context()
            t = threading.Thread(target=ctx.run, args=(self._work, b, h, kw), daemon=True,
                                 name=f"wkvaq-forward-{b}")
            self._threads.append(t)
            self._live.add(b)
            t.start()
        elif b not in self._live:
            raise RuntimeError(f"calibration batch {b}'s forward has already ended")
        self._commands[b].put(target)
        return self._await(b)

    def _await(self, b: int) -> tuple[str, Any]:
        kind, got, value = self._reports.get()
        if got != b:  # cannot happen: only batch b runs
            raise RuntimeError(f"PausedForwards: batch {got} reported while batch {b} ran")
        if kind != "paused":
            self._live.discard(b)
        if kind == "error":
            self.close()
            raise value
        return kind, value

    def _command(self, b: int) -> Any:
        target = self._commands[b].get()
        if target is None:
            raise _Abort
        self._local.target = target
        return target

    def _work(self, b: int, h: Tensor, kw: dict[str, Any]) -> None:
        self._local.batch = b
        try:
            self._command(b)
            with torch.no_grad():
                out = block_output(self.block(h, **kw))
            self._reports.put(("done", b, out.detach()))
        except _Abort:
            self._reports.put(("aborted", b, None))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread and raised there
            self._reports.put(("error", b, e))

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        if self.batch is None or getattr(self._local, "target", None) is not module:
            return
        self._reports.put(("paused", self.batch, args[0]))
        self._command(self.batch)
