"""Layer-wise quantization: a checkpoint far larger than memory, one decoder block at a time.

The model is built on the meta device (no memory); the checkpoint's safetensors shards are read
with plain file reads (safetensors_io), never mapped whole. Each decoder block in turn is
quantized and written to the output directory as its own shard:

- RTN needs no data and no module: every tensor of the block is read in row chunks of about
  `safetensors_io.CHUNK_BYTES`, quantized (weights are quantized row by row, unless per_tensor)
  and appended to the shard, so memory holds one chunk, not one block.
- GPTQ and AWQ (AWQ: scale and clip search, folded in, then RTN) read the modules the forward passes through before
  block 0 (embeddings, rotary embedding; never the head), capture block 0's inputs on the
  calibration windows, release those modules, then per block read it in, quantize it on its
  inputs, write it, compute the next block's inputs and release it (back to meta). With
  `offload_activations` the block inputs live in files, one batch in memory at a time.

At the end the remaining tensors (embeddings, norm, head: streamed in row chunks), the index
json, the config and the tokenizer files are written: a normal Hugging Face checkpoint of
fake-quantized weights.

Resumable: `STATE_FILE` in the output directory records the settings and the finished blocks
(written after each block's shard is in place); rerunning the same settings continues with the
next block (a calibrated run recomputes the inputs of the next block by running the finished
blocks, read back from the output or the source) and gives the same bytes as an uninterrupted
run. Other settings in the same directory are refused.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from wkvaq_quant.config import QuantArgs

from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.modeling.attach import block_linears, decoder_blocks
from wkvaq_quant.results import atomic_write_json
from wkvaq_quant.weights.algo import WeightAlgo
from wkvaq_quant.weights.registry import weight_algo_names
from wkvaq_quant.quantize import quantize
from wkvaq_quant.weights.blocks import BlockInputs, advance_block, capture_block_inputs, outside_modules
from wkvaq_quant.weights.safetensors_io import ShardWriter, TensorEntry, read_entries, read_rows, read_tensor, row_chunks

__all__ = ["ACTIVATIONS_DIR", "INDEX_FILE", "STATE_FILE", "SafetensorsCheckpoint", "quantize_layer_wise"]

STATE_FILE = "wkvaq_layerwise.json"
ACTIVATIONS_DIR = ".activations"
INDEX_FILE = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf")


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory's safetensors file(s), located from the shards'
    headers and read by name on demand (plain file reads, see safetensors_io)."""

    def __init__(self, path: str | Path) -> None:
        self.dir = Path(path)
        if not (self.dir / "config.json").is_file():
            raise ValueError(f"--layer_wise: {self.dir} is not a checkpoint directory (no config.json)")
        index, single = self.dir / INDEX_FILE, self.dir / "model.safetensors"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [f for f in files if not (self.dir / f).is_file()]
            if missing:
                raise ValueError(f"--layer_wise: {index} names shard(s) missing from {self.dir}: "
                                 f"{', '.join(missing)}")
        elif single.is_file():
            files = [single.name]
        else:
            other = sorted(p.name for p in self.dir.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
            raise ValueError(f"--layer_wise reads safetensors shards; {self.dir} has none"
                             + (f" (found {', '.join(other)})" if other else "")
                             + ". Convert once: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) "
                             "writes safetensors")
        self.entries = self._entries(files)

    def _entries(self, files: list[str]) -> dict[str, TensorEntry]:
        return {k: e for f in files for k, e in read_entries(self.dir / f).items()}

    @classmethod
    def of_shards(cls, path: Path, files: list[str]) -> SafetensorsCheckpoint:
        """The tensors of some safetensors files in `path` (no config needed)."""
        ckpt = cls.__new__(cls)
        ckpt.dir = Path(path)
        ckpt.entries = ckpt._entries(files)
        return ckpt

    def entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise ValueError(f"--layer_wise: {self.dir} lacks tensor {name}")
        return self.entries[name]

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, Tensor]:
        """The named tensors, floating-point ones converted to `dtype`."""
        return {n: _to_dtype(read_tensor(self.entry(n)), dtype) for n in names}


def _to_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype) if t.is_floating_point() else t


@dataclass
class _Skeleton:
    model: nn.Module
    blocks: list[nn.Module]
    prefixes: list[str]  # module name of each block


def _skeleton(ckpt: SafetensorsCheckpoint, dtype: torch.dtype, trust_remote_code: bool,
              for_capture: bool) -> _Skeleton:
    """The model on the meta device; with `for_capture`, the modules the forward passes through
    before decoder block 0 (embeddings, rotary embedding, final norm) are read in, the head is not."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt.dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                 attn_implementation="sdpa")
    model.eval()
    blocks = decoder_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = [names[id(b)] for b in blocks]
    sk = _Skeleton(model, blocks, prefixes)
    if not for_capture:
        return sk
    tied = getattr(config, "tie_word_embeddings", False)
    head = model.get_output_embeddings()
    head_keys = {f"{names[id(head)]}.{k}" for k in head.state_dict()} if head is not None and not tied else set()
    outside = [k for k in model.state_dict() if not k.startswith(_block_prefixes(sk)) and k not in head_keys]
    model.load_state_dict(ckpt.read([k for k in outside if k in ckpt.entries], dtype), strict=False, assign=True)
    if tied:
        model.tie_weights()
    in_blocks = {id(t) for b in blocks for t in [*b.parameters(), *b.buffers()]}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            meta_buffers = [b for b in child.buffers(recurse=False) if b.is_meta and id(b) not in in_blocks]
            if meta_buffers:  # non-persistent buffers (rotary inv_freq): build the module for real
                setattr(parent, child_name, type(child)(config=model.config))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_meta and not n.startswith(_block_prefixes(sk)) and n not in head_keys]
    if left:
        raise ValueError(f"--layer_wise: the checkpoint in {ckpt.dir} lacks {', '.join(left[:3])}")
    return sk


def _block_prefixes(sk: _Skeleton) -> tuple[str, ...]:
    return tuple(p + "." for p in sk.prefixes)


def _release_outside(sk: _Skeleton) -> None:
    """Back to meta: everything outside the decoder blocks (once the block inputs are captured)."""
    for m in outside_modules(sk.model, sk.blocks):
        m.to_empty(device="meta", recurse=False)


def _load_block(sk: _Skeleton, i: int, ckpt: SafetensorsCheckpoint, dtype: torch.dtype) -> None:
    block, prefix = sk.blocks[i], sk.prefixes[i]
    keys = list(block.state_dict())
    tensors = ckpt.read([f"{prefix}.{k}" for k in keys], dtype)
    block.load_state_dict({k: tensors[f"{prefix}.{k}"] for k in keys}, strict=True, assign=True)


def _release_block(sk: _Skeleton, i: int) -> None:
    sk.blocks[i].to_empty(device="meta")


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


Pieces = Iterator[tuple[str, Tensor]]
"""(tensor name, its next rows) in the order of a shard's specs, each tensor in full."""


def _write_shard(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], pieces: Pieces) -> None:
    """Write a safetensors file piece by piece, atomically (safetensors_io.ShardWriter)."""
    with ShardWriter(path, specs) as w:
        for name, rows in pieces:
            w.write(name, rows)


def _write_block(sk: _Skeleton, i: int, out: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 pieces: Pieces) -> str:
    name = _shard_name(i, len(sk.blocks) + 1)
    _write_shard(out / name, specs, pieces)
    return name


def _copy_specs(ckpt: SafetensorsCheckpoint, names: list[str], dtype: torch.dtype,
                shapes: dict[str, tuple[int, ...]] | None = None) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype after conversion, shape) of checkpoint tensors; `shapes` (the model's) are checked."""
    specs = []
    for n in names:
        e = ckpt.entry(n)
        if shapes is not None and tuple(shapes[n]) != e.shape:
            raise ValueError(f"--layer_wise: {n} has shape {e.shape} in {e.file}, the model config says "
                             f"{tuple(shapes[n])}")
        specs.append((n, dtype if e.dtype.is_floating_point else e.dtype, e.shape))
    return specs


def _streamed(ckpt: SafetensorsCheckpoint, name: str, dtype: torch.dtype, args: QuantArgs | None = None,
              device: str = "cpu") -> Pieces:
    """Checkpoint tensor `name` in row chunks, floating point converted to `dtype`; with `args`,
    fake-quantized on `device` (row by row, so chunking is exact; per_tensor weights in one piece)."""
    e = ckpt.entry(name)
    chunks = [(0, e.rows)] if args is not None and args.granularity == "per_tensor" else row_chunks(e)
    for start, stop in chunks:
        t = _to_dtype(read_rows(e, start, stop), dtype)
        yield name, t if args is None else quantize(t.to(device), args).x_hat.to(dtype)


def _copied(ckpt: SafetensorsCheckpoint, names: list[str], dtype: torch.dtype) -> Pieces:
    """Checkpoint tensors in row chunks, floating-point ones converted to `dtype`."""
    for n in names:
        yield from _streamed(ckpt, n, dtype)


def _rtn_block(sk: _Skeleton, i: int, ckpt: SafetensorsCheckpoint, plan: QuantPlan, dtype: torch.dtype,
               device: str) -> tuple[list, Pieces]:
    """Specs and pieces of block i quantized by RTN straight from the checkpoint, in row chunks
    (weights quantize row by row unless per_tensor), never the whole block in memory."""
    prefix = sk.prefixes[i]
    shapes = {f"{prefix}.{k}": v.shape for k, v in sk.blocks[i].state_dict().items()}
    names = list(shapes)
    w_args = {f"{name}.weight": plan.linear_args(b, short)[0] for b, short, name, _ in block_linears(sk.model)
              if b == i}

    def pieces() -> Pieces:
        for n in names:
            args = w_args.get(n)
            yield from _streamed(ckpt, n, dtype, args if args is not None and args.enabled else None, device)

    return _copy_specs(ckpt, names, dtype, shapes), pieces()


def _module_block(sk: _Skeleton, i: int) -> tuple[list, Pieces]:
    """Specs and pieces of block i as it is in memory."""
    state = {f"{sk.prefixes[i]}.{k}": v for k, v in sk.blocks[i].state_dict().items()}
    return [(k, v.dtype, tuple(v.shape)) for k, v in state.items()], iter(state.items())


def _open_state(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The run state in `out` (new, or a previous run of the same settings); refuses other settings."""
    state_path = out / STATE_FILE
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("settings") != settings:
            theirs = state.get("settings", {})
            diff = sorted(k for k in {*settings, *theirs} if settings.get(k) != theirs.get(k))
            raise ValueError(f"--save_quant {out} holds a layer-wise run with other settings (differing: "
                             f"{', '.join(diff)}); allowed: the same command to resume it, or another directory")
        state["done"] = [i for i in state["done"] if (out / state["shards"][str(i)]).is_file()]
        return state
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--save_quant {out} exists, is not empty and holds no layer-wise run; allowed: an "
                         f"empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    state = {"settings": settings, "done": [], "shards": {}, "complete": False}
    atomic_write_json(state_path, state)
    return state


def quantize_layer_wise(src: str | Path, out: str | Path, plan: QuantPlan, algo: WeightAlgo,
                        calib: Tensor | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        model_id: str | None = None, trust_remote_code: bool = False, progress: bool = True,
                        offload_activations: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Quantize the checkpoint in `src` block by block into `out` (see the module docstring);
    returns the run state ({"settings", "done", "shards", "complete"}). With `offload_activations`
    the calibration activations live in files under `out/ACTIVATIONS_DIR` (removed at the end)."""
    if algo.needs_calib and calib is None:
        raise ValueError(f"--weight_algo {algo.name} needs calibration windows")
    if offload_activations and not algo.needs_calib:
        raise ValueError(f"--offload_activations: --weight_algo {algo.name} uses no calibration activations; "
                         f"allowed with: {', '.join(a for a in weight_algo_names() if WeightAlgo(a).needs_calib)}")
    if offload_activations:
        algo.check_offload_activations()
    ckpt = SafetensorsCheckpoint(src)
    out = Path(out)
    settings = {"model": model_id or str(Path(src).resolve()), "dtype": str(dtype).removeprefix("torch."),
                "plan": plan.to_dict(), "weight_algo": algo.to_dict(result_only=True)}
    state = _open_state(out, settings)
    if state["complete"]:
        log(f"[wkvaq] {out}: layer-wise checkpoint already complete")
        return state
    sk = _skeleton(ckpt, dtype, trust_remote_code, for_capture=algo.needs_calib)
    n = len(sk.blocks)
    if plan.layers is not None:
        plan.layers.check_depth(n)
    done = set(state["done"])
    inputs: BlockInputs | None = None
    offload_dir = out / ACTIVATIONS_DIR if offload_activations else None
    if offload_dir is not None:
        shutil.rmtree(offload_dir, ignore_errors=True)  # left by a killed run
    if algo.needs_calib:
        inputs = capture_block_inputs(sk.model, calib, device, offload_dir=offload_dir)
        _release_outside(sk)
    for i in tqdm(range(n), desc="layer-wise blocks", disable=not progress):
        if i in done and inputs is None:
            continue
        if i in done:  # only its outputs are needed: the next block's inputs
            from_out = algo.next_inputs == "quantized"
            _load_block(sk, i, SafetensorsCheckpoint.of_shards(out, [state["shards"][str(i)]]) if from_out else ckpt,
                        dtype)
            inputs = advance_block(sk.blocks[i].to(device), i, inputs, lambda *a: None, device, "quantized")
            _release_block(sk, i)
            continue
        if inputs is None:
            state["shards"][str(i)] = _write_block(sk, i, out, *_rtn_block(sk, i, ckpt, plan, dtype, device))
        else:
            _load_block(sk, i, ckpt, dtype)
            block = sk.blocks[i].to(device)
            inputs = advance_block(block, i, inputs, _calibrated(sk, plan, algo, device), device, algo.next_inputs,
                                   fp_outputs_from_process=algo.spec.fp_outputs_from_process)
            block.to("cpu")
            state["shards"][str(i)] = _write_block(sk, i, out, *_module_block(sk, i))
            _release_block(sk, i)
        state["done"] = sorted({*state["done"], i})
        atomic_write_json(out / STATE_FILE, state)
    if inputs is not None:
        inputs.discard()
    if offload_dir is not None:
        shutil.rmtree(offload_dir, ignore_errors=True)
    _finish(sk, ckpt, out, state, dtype)
    log(f"[wkvaq] wrote the layer-wise quantized checkpoint {out} ({n} blocks)")
    return state


def _calibrated(sk: _Skeleton, plan: QuantPlan, algo: WeightAlgo, device: str) -> Callable:
    """process(i, block, inputs) of a calibrated algorithm: quantize block i in place (its registered step)."""

    def process(i: int, block: nn.Module, inputs: BlockInputs) -> BlockInputs | None:
        return algo.spec.block(sk.model, i, block, sk.prefixes[i], inputs, plan, algo, device)

    return process


def _shard_bytes(path: Path) -> tuple[list[str], int]:
    """(tensor names, bytes of their data) of a safetensors file, from its header."""
    entries = read_entries(path)
    return list(entries), sum(e.nbytes for e in entries.values())


def _finish(sk: _Skeleton, ckpt: SafetensorsCheckpoint, out: Path, state: dict[str, Any], dtype: torch.dtype) -> None:
    """The rest of the tensors (streamed in row chunks), the index, the config and the tokenizer
    files; then mark complete."""
    n = len(sk.blocks)
    rest = [k for k in ckpt.entries if not k.startswith(_block_prefixes(sk))]
    rest_name = _shard_name(n, n + 1)
    _write_shard(out / rest_name, _copy_specs(ckpt, rest, dtype), _copied(ckpt, rest, dtype))
    weight_map, total = {}, 0
    for shard in [*(state["shards"][str(i)] for i in range(n)), rest_name]:
        names, size = _shard_bytes(out / shard)
        weight_map.update({k: shard for k in names})
        total += size
    atomic_write_json(out / INDEX_FILE, {"metadata": {"total_size": total},
                                         "weight_map": dict(sorted(weight_map.items()))})
    for p in sorted(ckpt.dir.iterdir()):
        if p.is_file() and p.suffix not in _WEIGHT_SUFFIXES and p.name not in (INDEX_FILE, STATE_FILE) \
                and not p.name.startswith("."):
            shutil.copy2(p, out / p.name)
    state["complete"] = True
    atomic_write_json(out / STATE_FILE, state)
