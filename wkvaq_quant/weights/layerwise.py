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

Resumable: `STATE_FILE` in the output directory records the settings, the finished blocks and,
for every file written (block shards, the rest shard, the index), its size and sha256 (written
after each block's shard is in place); rerunning the same settings first verifies every finished
shard (size, a readable header declaring that size, the checksum) and redoes a damaged or missing
one (logged, never trusted), then continues with the next block (a calibrated run recomputes the
inputs of the next block by running the finished blocks, read back from the output or the source)
and gives the same bytes as an uninterrupted run. A complete checkpoint is verified the same way
(also its rest shard and index) on every rerun. Other settings in the same directory are refused.

One run at a time: a run holds an exclusive `flock` on `LOCK_FILE` inside the output directory
(released when the run ends or dies); a second run into the same directory is refused at once.
Stale temporary files of this writer (`.NAME.XXX.tmp` of a shard, the state or the index, left
by a killed run) and `ACTIVATIONS_DIR` are removed at the start of a run (under the lock), and a
complete checkpoint has none.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from contextlib import contextmanager
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
from wkvaq_quant.weights.safetensors_io import (ShardWriter, TensorEntry, check_shard, file_sha256, read_entries,
                                                read_rows, read_tensor, row_chunks, tmp_target)

__all__ = ["ACTIVATIONS_DIR", "INDEX_FILE", "LOCK_FILE", "STATE_FILE", "SafetensorsCheckpoint", "check_complete",
           "quantize_layer_wise"]

STATE_FILE = "wkvaq_layerwise.json"
ACTIVATIONS_DIR = ".activations"
INDEX_FILE = "model.safetensors.index.json"
LOCK_FILE = ".wkvaq_layerwise.lock"
"""Held (flock) by the run writing the directory; not part of the checkpoint (never copied or listed)."""
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf")


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory's safetensors file(s), located from the shards'
    headers and read by name on demand (plain file reads, see safetensors_io)."""

    def __init__(self, path: str | Path, what: str = "--layer_wise") -> None:
        self.dir, self.what = Path(path), what
        if not (self.dir / "config.json").is_file():
            raise ValueError(f"{what}: {self.dir} is not a checkpoint directory (no config.json)")
        index, single = self.dir / INDEX_FILE, self.dir / "model.safetensors"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [f for f in files if not (self.dir / f).is_file()]
            if missing:
                raise ValueError(f"{what}: {index} names shard(s) missing from {self.dir}: "
                                 f"{', '.join(missing)}")
        elif single.is_file():
            files = [single.name]
        else:
            other = sorted(p.name for p in self.dir.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
            raise ValueError(f"{what} reads safetensors shards; {self.dir} has none"
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
        ckpt.dir, ckpt.what = Path(path), "--layer_wise"
        ckpt.entries = ckpt._entries(files)
        return ckpt

    def entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise ValueError(f"{self.what}: {self.dir} lacks tensor {name}")
        return self.entries[name]

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, Tensor]:
        """The named tensors, floating-point ones converted to `dtype`."""
        return {n: read_converted(self.entry(n), dtype) for n in names}


def read_converted(entry: TensorEntry, dtype: torch.dtype) -> Tensor:
    """A checkpoint tensor, floating point converted to `dtype`: converted in row chunks into the
    result, so the stored copy is never whole in memory beside it (an embedding of 2 GB in FP32
    needs 2 GB, not 3)."""
    if not entry.dtype.is_floating_point or entry.dtype == dtype or entry.rows <= 1:
        return _to_dtype(read_tensor(entry), dtype)
    out = torch.empty(entry.shape, dtype=dtype)
    for start, stop in row_chunks(entry):
        out[start:stop] = read_rows(entry, start, stop)
    return out


def _to_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype) if t.is_floating_point() else t


@dataclass
class _Skeleton:
    model: nn.Module
    blocks: list[nn.Module]
    prefixes: list[str]  # module name of each block


def _skeleton(ckpt: SafetensorsCheckpoint, trust_remote_code: bool, attn_implementation: str = "sdpa") -> _Skeleton:
    """The model on the meta device (no weights read; see _read_outside)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt.dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                 attn_implementation=attn_implementation)
    model.eval()
    blocks = decoder_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = [names[id(b)] for b in blocks]
    return _Skeleton(model, blocks, prefixes)


def module_keys(model: nn.Module, module: nn.Module | None) -> set[str]:
    """The state-dict names, within `model`, of `module`'s tensors (none for None)."""
    if module is None:
        return set()
    prefix = next(n for n, m in model.named_modules() if m is module)
    return {f"{prefix}.{k}" if prefix else k for k in module.state_dict()}


def _read_outside(sk: _Skeleton, ckpt: SafetensorsCheckpoint, dtype: torch.dtype, head: bool = False,
                  embeddings: bool = True) -> None:
    """Read in the modules outside the decoder blocks (embeddings, rotary embedding, final norm),
    the head too with `head`, the input embeddings only with `embeddings` (or when tied to the head)."""
    model, blocks = sk.model, sk.blocks
    config = model.config
    tied = getattr(config, "tie_word_embeddings", False)
    skipped = (module_keys(model, model.get_output_embeddings()) if not tied and not head else set()) | \
        (module_keys(model, model.get_input_embeddings()) if not tied and not embeddings else set())
    outside = [k for k in model.state_dict() if not k.startswith(_block_prefixes(sk)) and k not in skipped]
    model.load_state_dict(ckpt.read([k for k in outside if k in ckpt.entries], dtype), strict=False, assign=True)
    if tied:
        model.tie_weights()
    in_blocks = {id(t) for b in blocks for t in [*b.parameters(), *b.buffers()]}
    for module in model.modules():
        meta_buffers = [n for n, b in module.named_buffers(recurse=False) if b.is_meta and id(b) not in in_blocks]
        if meta_buffers:  # non-persistent buffers (rotary inv_freq, Gemma's embedding scale)
            _init_buffers(model, module, meta_buffers, ckpt.what)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_meta and not n.startswith(_block_prefixes(sk)) and n not in skipped]
    if left:
        raise ValueError(f"{ckpt.what}: the checkpoint in {ckpt.dir} lacks {', '.join(left[:3])}")


def _init_buffers(model: nn.Module, module: nn.Module, names: list[str], what: str) -> None:
    """Compute a module's non-persistent buffers as transformers does after loading from meta: real
    placeholders (NaN), then the model's `_init_weights`, which skips every tensor flagged
    `_is_hf_initialized` (here: the module's loaded parameters and buffers). A buffer it leaves
    at NaN is refused."""
    for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        if not t.is_meta:
            t._is_hf_initialized = True
    for n in names:
        module.register_buffer(n, torch.full_like(module._buffers[n], float("nan"), device="cpu"), persistent=False)
    model._init_weights(module)
    left = [n for n in names if module._buffers[n].isnan().any()]
    if left:
        raise ValueError(f"{what}: {type(module).__name__}'s buffers {left} could not be computed")


def _block_prefixes(sk: _Skeleton) -> tuple[str, ...]:
    return tuple(p + "." for p in sk.prefixes)


def _release_outside(sk: _Skeleton) -> None:
    """Back to meta: everything outside the decoder blocks (once the block inputs are captured)."""
    for m in outside_modules(sk.model, sk.blocks):
        m.to_empty(device="meta", recurse=False)


def _block_tensor_names(sk: _Skeleton, i: int) -> list[str]:
    return [f"{sk.prefixes[i]}.{k}" for k in sk.blocks[i].state_dict()]


def _assign_block(sk: _Skeleton, i: int, tensors: dict[str, Tensor]) -> None:
    """Put the tensors of block i (by checkpoint name, as `_block_tensor_names`) into the block."""
    block, prefix = sk.blocks[i], sk.prefixes[i]
    block.load_state_dict({k: tensors[f"{prefix}.{k}"] for k in block.state_dict()}, strict=True, assign=True)
    left = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
    if left:  # e.g. a non-persistent buffer inside the block: not in any checkpoint
        raise ValueError(f"{prefix}: {', '.join(left[:3])} is not in the checkpoint (a buffer the block builds "
                         f"itself); block-by-block loading does not support {type(block).__name__}")


def _load_block(sk: _Skeleton, i: int, ckpt: SafetensorsCheckpoint, dtype: torch.dtype) -> None:
    _assign_block(sk, i, ckpt.read(_block_tensor_names(sk, i), dtype))


def _release_block(sk: _Skeleton, i: int) -> None:
    sk.blocks[i].to_empty(device="meta")


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


Pieces = Iterator[tuple[str, Tensor]]
"""(tensor name, its next rows) in the order of a shard's specs, each tensor in full."""


FileRecord = dict[str, Any]
"""{"bytes": size, "sha256": hex digest} of a file written, as the run state records it."""


def _write_shard(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], pieces: Pieces) -> FileRecord:
    """Write a safetensors file piece by piece, atomically (safetensors_io.ShardWriter); its record
    (size and sha256, hashed while writing)."""
    with ShardWriter(path, specs) as w:
        for name, rows in pieces:
            w.write(name, rows)
    return {"bytes": w.nbytes, "sha256": w.sha256}


def _write_block(sk: _Skeleton, i: int, out: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 pieces: Pieces) -> tuple[str, FileRecord]:
    name = _shard_name(i, len(sk.blocks) + 1)
    return name, _write_shard(out / name, specs, pieces)


def _copy_specs(ckpt: SafetensorsCheckpoint, names: list[str], dtype: torch.dtype,
                shapes: dict[str, tuple[int, ...]] | None = None) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype after conversion, shape) of checkpoint tensors; `shapes` (the model's) are checked."""
    specs = []
    for n in names:
        e = ckpt.entry(n)
        if shapes is not None and tuple(shapes[n]) != e.shape:
            raise ValueError(f"{ckpt.what}: {n} has shape {e.shape} in {e.file}, the model config says "
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


def _save_state(out: Path, state: dict[str, Any]) -> None:
    """Write the run state atomically, its file records in name order (the same bytes however a
    run was interrupted and resumed)."""
    state["files"] = dict(sorted(state.get("files", {}).items()))
    order = ("settings", "done", "shards", "files", "rest_shard", "complete")
    atomic_write_json(out / STATE_FILE, {**{k: state[k] for k in order if k in state}, **state})


def _foreign_entries(out: Path) -> list[str]:
    """What `out` holds besides this writer's lock and stale temporary files (none when it is new)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE and not _is_stale_tmp(p.name))


def _is_stale_tmp(name: str) -> bool:
    """A temporary file of this writer (a shard's, the state's, the index's); stale when the lock is held."""
    target = tmp_target(name)
    return target is not None and (target in (STATE_FILE, INDEX_FILE) or bool(_SHARD_RE.match(target)))


def _remove_stale(out: Path, log: Callable[[str], None]) -> None:
    """Remove the temporary files a killed run left (only while holding the lock) and ACTIVATIONS_DIR."""
    stale = sorted(p for p in out.iterdir() if p.is_file() and _is_stale_tmp(p.name))
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log(f"[wkvaq] {out}: removed {len(stale)} stale temporary file(s) of an interrupted run: "
            f"{', '.join(p.name for p in stale)}")
    shutil.rmtree(out / ACTIVATIONS_DIR, ignore_errors=True)


@contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking flock on `out/LOCK_FILE` (created with `out`); another holder
    is refused at once. The kernel releases it when the process ends, however it ends."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            raise ValueError(f"--save_quant {out}: another layer-wise run holds it"
                             + (f" (pid {holder})" if holder.isdigit() else "")
                             + f" (lock {out / LOCK_FILE}); allowed: wait until it ends, or another directory") \
                from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _refuse_foreign(out: Path) -> None:
    if not (out / STATE_FILE).is_file() and _foreign_entries(out):
        raise ValueError(f"--save_quant {out} exists, is not empty and holds no layer-wise run; allowed: an "
                         f"empty or new directory")


def _open_state(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The run state in `out` (new, or a previous run of the same settings); refuses other settings.
    Called with the lock held and `out` created."""
    state_path = out / STATE_FILE
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("settings") != settings:
            theirs = state.get("settings", {})
            diff = sorted(k for k in {*settings, *theirs} if settings.get(k) != theirs.get(k))
            raise ValueError(f"--save_quant {out} holds a layer-wise run with other settings (differing: "
                             f"{', '.join(diff)}); allowed: the same command to resume it, or another directory")
        state.setdefault("files", {})
        return state
    _refuse_foreign(out)
    state = {"settings": settings, "done": [], "shards": {}, "files": {}, "complete": False}
    _save_state(out, state)
    return state


def _file_problem(path: Path, record: FileRecord | None, check: Callable[[Path], Any]) -> str | None:
    """Why the file at `path` is not the one `record` describes (None: it is): missing, no record,
    another size, `check` failing (an unreadable header), another sha256."""
    if not path.is_file():
        return "missing"
    if not isinstance(record, dict) or "bytes" not in record or "sha256" not in record:
        return "no size and checksum recorded (written by an older version)"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{size} bytes, {record['bytes']} recorded" + (" (truncated)" if size < record["bytes"] else "")
    try:
        check(path)
    except (OSError, ValueError) as err:
        return f"unreadable: {err}"
    if file_sha256(path) != record["sha256"]:
        return "sha256 differs from the recorded one"
    return None


def _check_index(path: Path) -> None:
    index = json.loads(path.read_text())
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise ValueError(f"{path} has no weight_map")


def _damaged(out: Path, state: dict[str, Any]) -> tuple[dict[int, str], dict[str, str]]:
    """({finished block: why its shard is not trusted}, {final file: why}) of the run state in `out`;
    the final files (rest shard, index) only when the state says complete. Reads only."""
    files = state.get("files", {})
    blocks = {}
    for i in state["done"]:
        name = state["shards"].get(str(i))
        problem = "no shard recorded" if name is None else _file_problem(out / name, files.get(name), check_shard)
        if problem is not None:
            blocks[i] = problem
    final = {}
    if state["complete"]:
        rest = state.get("rest_shard")
        for name, check in ((rest, check_shard), (INDEX_FILE, _check_index)):
            problem = "not recorded" if name is None else _file_problem(out / name, files.get(name), check)
            if problem is not None:
                final[name or "the rest shard"] = problem
    return blocks, final


def _verify(out: Path, state: dict[str, Any], log: Callable[[str], None]) -> None:
    """Drop from `state` every finished shard that is not what it recorded (logged, its file removed:
    the block is redone), and the complete mark when anything is damaged (the final files are
    rewritten); the state file is rewritten when anything changed."""
    blocks, final = _damaged(out, state)
    for i, problem in blocks.items():
        name = state["shards"].get(str(i))
        log(f"[wkvaq] {out / name if name else out}: damaged shard of block {i} ({problem}); not trusted, "
            f"block {i} is redone")
        if name is not None:
            (out / name).unlink(missing_ok=True)
            state["files"].pop(name, None)
    for name, problem in final.items():
        log(f"[wkvaq] {out / name}: damaged ({problem}); not trusted, it is rewritten")
    if blocks or final:
        state["done"] = [i for i in state["done"] if i not in blocks]
        state["complete"] = False
        _save_state(out, state)


def check_complete(out: str | Path) -> str | None:
    """None when `out` holds a complete layer-wise checkpoint whose every shard and index are intact
    (size, header, sha256 as recorded); otherwise why not. Reads only (no lock)."""
    out = Path(out)
    try:
        state = json.loads((out / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        return f"no readable run state {out / STATE_FILE} ({err.__class__.__name__})"
    if not state.get("complete"):
        return f"{out}: the layer-wise run is not complete"
    blocks, final = _damaged(out, state)
    problems = [f"block {i}: {p}" for i, p in blocks.items()] + [f"{n}: {p}" for n, p in final.items()]
    return f"{out}: damaged: {'; '.join(problems)}" if problems else None


def quantize_layer_wise(src: str | Path, out: str | Path, plan: QuantPlan, algo: WeightAlgo,
                        calib: Tensor | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        model_id: str | None = None, trust_remote_code: bool = False, progress: bool = True,
                        offload_activations: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Quantize the checkpoint in `src` block by block into `out` (see the module docstring);
    returns the run state ({"settings", "done", "shards", "files", "rest_shard", "complete"}; "files":
    {file name: {"bytes", "sha256"}}). With `offload_activations`
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
    _refuse_foreign(out)  # before the lock file is created in someone else's directory
    with _run_lock(out):
        _remove_stale(out, log)
        state = _open_state(out, settings)
        _verify(out, state, log)
        if state["complete"]:
            log(f"[wkvaq] {out}: layer-wise checkpoint already complete (every shard verified)")
            return state
        _run(ckpt, out, state, plan, algo, calib, dtype, device, trust_remote_code, progress, offload_activations)
        _remove_stale(out, log)  # none can be left by this run; a complete checkpoint has none
        state["complete"] = True
        _save_state(out, state)
    log(f"[wkvaq] wrote the layer-wise quantized checkpoint {out} ({len(state['done'])} blocks)")
    return state


def _run(ckpt: SafetensorsCheckpoint, out: Path, state: dict[str, Any], plan: QuantPlan, algo: WeightAlgo,
         calib: Tensor | None, dtype: torch.dtype, device: str, trust_remote_code: bool, progress: bool,
         offload_activations: bool) -> None:
    """Quantize and write the blocks not done yet, then the final files (the lock is held)."""
    sk = _skeleton(ckpt, trust_remote_code)
    n = len(sk.blocks)
    if plan.layers is not None:
        plan.layers.check_depth(n)
    done = set(state["done"])
    todo = [i for i in range(n) if i not in done]
    inputs: BlockInputs | None = None
    offload_dir = out / ACTIVATIONS_DIR if offload_activations else None
    if algo.needs_calib and todo:  # finished blocks after the last one to do need not run
        _read_outside(sk, ckpt, dtype)
        inputs = capture_block_inputs(sk.model, calib, device, offload_dir=offload_dir)
        _release_outside(sk)
    for i in tqdm(range(max(todo) + 1 if todo else 0), desc="layer-wise blocks", disable=not progress):
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
            name, record = _write_block(sk, i, out, *_rtn_block(sk, i, ckpt, plan, dtype, device))
        else:
            _load_block(sk, i, ckpt, dtype)
            block = sk.blocks[i].to(device)
            inputs = advance_block(block, i, inputs, _calibrated(sk, plan, algo, device), device, algo.next_inputs,
                                   fp_outputs_from_process=algo.spec.fp_outputs_from_process)
            block.to("cpu")
            name, record = _write_block(sk, i, out, *_module_block(sk, i))
            _release_block(sk, i)
        state["shards"][str(i)] = name
        state["files"][name] = record
        state["done"] = sorted({*state["done"], i})
        _save_state(out, state)
    if inputs is not None:
        inputs.discard()
    if offload_dir is not None:
        shutil.rmtree(offload_dir, ignore_errors=True)
    _finish(sk, ckpt, out, state, dtype)


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
    files, each recorded in the state (the caller marks it complete)."""
    n = len(sk.blocks)
    rest = [k for k in ckpt.entries if not k.startswith(_block_prefixes(sk))]
    rest_name = _shard_name(n, n + 1)
    state["files"][rest_name] = _write_shard(out / rest_name, _copy_specs(ckpt, rest, dtype), _copied(ckpt, rest, dtype))
    state["rest_shard"] = rest_name
    weight_map, total = {}, 0
    for shard in [*(state["shards"][str(i)] for i in range(n)), rest_name]:
        names, size = _shard_bytes(out / shard)
        weight_map.update({k: shard for k in names})
        total += size
    atomic_write_json(out / INDEX_FILE, {"metadata": {"total_size": total},
                                         "weight_map": dict(sorted(weight_map.items()))})
    state["files"][INDEX_FILE] = {"bytes": (out / INDEX_FILE).stat().st_size, "sha256": file_sha256(out / INDEX_FILE)}
    for p in sorted(ckpt.dir.iterdir()):
        if p.is_file() and p.suffix not in _WEIGHT_SUFFIXES and p.name not in (INDEX_FILE, STATE_FILE, LOCK_FILE) \
                and not p.name.startswith("."):
            shutil.copy2(p, out / p.name)
