"""Layer-wise quantization: a checkpoint far larger than memory, one decoder block at a time.

The model is built on the meta device (no memory); the modules outside the decoder blocks
(embeddings, final norm, head, rotary embedding) are read from the checkpoint's safetensors
shards; then each decoder block in turn is read from the shards, quantized (RTN needs no data;
GPTQ uses the captured block inputs), written to the output directory as its own shard, and
released (back to meta). At the end the remaining tensors, the index json, the config and the
tokenizer files are written: a normal Hugging Face checkpoint of fake-quantized weights.

Resumable: `STATE_FILE` in the output directory records the settings and the finished blocks
(written after each block's shard is in place); rerunning the same settings continues with the
next block (GPTQ recomputes the inputs of the next block by running the finished blocks, read
back from the output or the source) and gives the same bytes as an uninterrupted run. Other
settings in the same directory are refused.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from wkvaq_quant.config import QuantPlan
from wkvaq_quant.modeling.attach import block_linears, decoder_blocks
from wkvaq_quant.results import atomic_write_json
from wkvaq_quant.weights.algo import WeightAlgo
from wkvaq_quant.weights.blocks import BlockInputs, capture_block_inputs, run_block
from wkvaq_quant.weights.gptq import gptq_block
from wkvaq_quant.weights.rtn import rtn_quantize

__all__ = ["INDEX_FILE", "LAYERWISE_ALGOS", "STATE_FILE", "SafetensorsCheckpoint", "quantize_layer_wise"]

STATE_FILE = "wkvaq_layerwise.json"
INDEX_FILE = "model.safetensors.index.json"
LAYERWISE_ALGOS = ("rtn", "gptq")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf")


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory's safetensors file(s), read by name on demand."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.dir = Path(path)
        if not (self.dir / "config.json").is_file():
            raise ValueError(f"--layer_wise: {self.dir} is not a checkpoint directory (no config.json)")
        index, single = self.dir / INDEX_FILE, self.dir / "model.safetensors"
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in self.weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise ValueError(f"--layer_wise: {index} names shard(s) missing from {self.dir}: "
                                 f"{', '.join(missing)}")
        elif single.is_file():
            with safe_open(single, "pt") as fh:
                self.weight_map = {k: single.name for k in fh.keys()}
        else:
            other = sorted(p.name for p in self.dir.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
            raise ValueError(f"--layer_wise reads safetensors shards; {self.dir} has none"
                             + (f" (found {', '.join(other)})" if other else "")
                             + ". Convert once: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) "
                             "writes safetensors")

    @classmethod
    def of_shards(cls, path: Path, files: list[str]) -> SafetensorsCheckpoint:
        """The tensors of some safetensors files in `path` (no config needed)."""
        ckpt = cls.__new__(cls)
        ckpt.dir, ckpt.weight_map = Path(path), {k: f for f in files for k in _shard_bytes(Path(path) / f)[0]}
        return ckpt

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, Tensor]:
        from safetensors import safe_open

        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise ValueError(f"--layer_wise: {self.dir} lacks tensor(s) {', '.join(missing[:3])}")
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out: dict[str, Tensor] = {}
        for f, group in by_file.items():
            with safe_open(self.dir / f, "pt") as fh:
                for n in group:
                    t = fh.get_tensor(n)
                    out[n] = t.to(dtype) if t.is_floating_point() else t
        return out


@dataclass
class _Skeleton:
    model: nn.Module
    blocks: list[nn.Module]
    prefixes: list[str]  # module name of each block


def _skeleton(ckpt: SafetensorsCheckpoint, dtype: torch.dtype, trust_remote_code: bool) -> _Skeleton:
    """The model on the meta device, with everything outside the decoder blocks read in."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt.dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                 attn_implementation="sdpa")
    model.eval()
    blocks = decoder_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = [names[id(b)] for b in blocks]
    outside = [k for k in model.state_dict() if not k.startswith(tuple(p + "." for p in prefixes))]
    present = [k for k in outside if k in ckpt.weight_map]
    model.load_state_dict(ckpt.read(present, dtype), strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    in_blocks = {id(t) for b in blocks for t in [*b.parameters(), *b.buffers()]}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            meta_buffers = [b for b in child.buffers(recurse=False) if b.is_meta and id(b) not in in_blocks]
            if meta_buffers:  # non-persistent buffers (rotary inv_freq): build the module for real
                setattr(parent, child_name, type(child)(config=model.config))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_meta and not n.startswith(tuple(p + "." for p in prefixes))]
    if left:
        raise ValueError(f"--layer_wise: the checkpoint in {ckpt.dir} lacks {', '.join(left[:3])}")
    return _Skeleton(model, blocks, prefixes)


def _load_block(sk: _Skeleton, i: int, ckpt: SafetensorsCheckpoint, dtype: torch.dtype) -> None:
    block, prefix = sk.blocks[i], sk.prefixes[i]
    keys = list(block.state_dict())
    tensors = ckpt.read([f"{prefix}.{k}" for k in keys], dtype)
    block.load_state_dict({k: tensors[f"{prefix}.{k}"] for k in keys}, strict=True, assign=True)


def _release_block(sk: _Skeleton, i: int) -> None:
    sk.blocks[i].to_empty(device="meta")


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_shard(path: Path, tensors: dict[str, Tensor]) -> None:
    """Write a safetensors file atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _write_block(sk: _Skeleton, i: int, out: Path) -> str:
    name = _shard_name(i, len(sk.blocks) + 1)
    _write_shard(out / name, {f"{sk.prefixes[i]}.{k}": v for k, v in sk.blocks[i].state_dict().items()})
    return name


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
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Quantize the checkpoint in `src` block by block into `out` (see the module docstring);
    returns the run state ({"settings", "done", "shards", "complete"})."""
    if algo.name not in LAYERWISE_ALGOS:
        raise ValueError(f"--weight_algo {algo.name} with --layer_wise: allowed: {', '.join(LAYERWISE_ALGOS)}")
    if algo.needs_calib and calib is None:
        raise ValueError(f"--weight_algo {algo.name} needs calibration windows")
    ckpt = SafetensorsCheckpoint(src)
    out = Path(out)
    settings = {"model": model_id or str(Path(src).resolve()), "dtype": str(dtype).removeprefix("torch."),
                "plan": plan.to_dict(), "weight_algo": algo.to_dict()}
    state = _open_state(out, settings)
    if state["complete"]:
        log(f"[wkvaq] {out}: layer-wise checkpoint already complete")
        return state
    sk = _skeleton(ckpt, dtype, trust_remote_code)
    n = len(sk.blocks)
    if plan.layers is not None:
        plan.layers.check_depth(n)
    done = set(state["done"])
    inputs: BlockInputs | None = None
    if algo.needs_calib:
        inputs = capture_block_inputs(sk.model, calib, device)
    gptq = algo.gptq
    for i in tqdm(range(n), desc="layer-wise blocks", disable=not progress):
        if i in done and inputs is None:
            continue
        from_out = i in done and gptq.next_inputs == "quantized"
        _load_block(sk, i, SafetensorsCheckpoint.of_shards(out, [state["shards"][str(i)]]) if from_out else ckpt,
                    dtype)
        if i in done:  # only its outputs are needed: the next block's inputs
            sk.blocks[i].to(device)
            inputs = inputs.with_hidden(run_block(sk.blocks[i], inputs, device))
            _release_block(sk, i)
            continue
        block = sk.blocks[i].to(device)
        if algo.name == "rtn":
            rtn_quantize(sk.model, plan, blocks={i})
        else:
            fp_out = run_block(block, inputs, device) if gptq.next_inputs == "fp" else None
            lins = [(short, lin) for b, short, _, lin in block_linears(sk.model) if b == i]
            gptq_block(block, i, lins, inputs, plan, gptq, device)
            inputs = inputs.with_hidden(fp_out if fp_out is not None else run_block(block, inputs, device))
        block.to("cpu")
        state["shards"][str(i)] = _write_block(sk, i, out)
        state["done"] = sorted({*state["done"], i})
        atomic_write_json(out / STATE_FILE, state)
        _release_block(sk, i)
    _finish(sk, ckpt, out, state)
    log(f"[wkvaq] wrote the layer-wise quantized checkpoint {out} ({n} blocks)")
    return state


def _shard_bytes(path: Path) -> tuple[list[str], int]:
    """(tensor names, bytes of their data) of a safetensors file, from its header."""
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    header.pop("__metadata__", None)
    return list(header), sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())


def _finish(sk: _Skeleton, ckpt: SafetensorsCheckpoint, out: Path, state: dict[str, Any]) -> None:
    """The rest of the tensors, the index, the config and the tokenizer files; then mark complete."""
    n = len(sk.blocks)
    block_prefixes = tuple(p + "." for p in sk.prefixes)
    rest = [k for k in ckpt.weight_map if not k.startswith(block_prefixes)]
    rest_name = _shard_name(n, n + 1)
    dtype = next(t for t in sk.model.parameters() if not t.is_meta).dtype
    _write_shard(out / rest_name, ckpt.read(rest, dtype))
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
