"""The AWQ cache file: `{"scale", "clip", "grid", "meta"}`, saved atomically, loaded with
`weights_only=True`, refused when it was made for another model or another weight format.

    scale: {previous op's module name: {"layers": [names of the linears it feeds], "scales": [C] fp32}}
    clip:  {linear's module name: {"max_val": max |w| per (output row, input group) [out, n_groups] fp32,
            "group_size": its input group size (the last group is shorter when it does not divide)}}
    grid:  {linear's module name: BitMoD grid id per (output row, group) [out, n_groups] uint8}
           (the grids the final weights get; empty for formats without a per-group choice)
    meta:  {"version", "model", "shapes": {linear: [out, in]}, "format": {dtype, bits, group_size,
            double_quant}, "layers": {linear: its weight setting or "fp"}, "search": {...}}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wkvaq_quant.config import QuantArgs

from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.modeling.attach import block_linears

__all__ = ["CACHE_VERSION", "cache_meta", "check_cache", "check_cache_model", "load_cache", "save_cache"]

CACHE_VERSION = 1


def _args_key(args: QuantArgs) -> str:
    if not args.enabled:
        return "fp"
    return (f"{args.dtype}:{args.bits}:g{args.group_size}:{'sym' if args.symmetric else 'asym'}"
            + (":dq" if args.double_quant else ""))


def cache_meta(model: nn.Module, model_id: str, plan: QuantPlan, search: dict[str, Any] | None = None) -> dict:
    """What a cache was made for: the model, its layer shapes and every layer's weight format."""
    lins = block_linears(model)
    return {
        "version": CACHE_VERSION,
        "model": model_id,
        "shapes": {name: list(lin.weight.shape) for _, _, name, lin in lins},
        "format": {"dtype": plan.w.dtype, "bits": plan.w.bits, "group_size": plan.w.group_size,
                   "double_quant": plan.w.double_quant},
        "layers": {name: _args_key(plan.linear_args(b, short)[0]) for b, short, name, _ in lins},
        "search": dict(search or {}),
    }


def save_cache(cache: dict, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file next to `path`, then rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(cache, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_cache(path: str | os.PathLike) -> dict:
    """Read a cache written by `save_cache` (tensors and plain containers only)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--load_awq {str(path)!r}: no such file (make one with --run_awq --dump_awq PATH)")
    try:
        cache = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have many types
        raise ValueError(f"--load_awq {str(path)!r}: not a readable AWQ cache ({type(err).__name__}: {err})") from None
    if not isinstance(cache, dict) or not {"scale", "clip", "meta"} <= set(cache):
        raise ValueError(f"--load_awq {str(path)!r}: not an AWQ cache (expected keys scale, clip, meta)")
    if not isinstance(cache["meta"], dict):
        raise ValueError(f"--load_awq {str(path)!r}: not an AWQ cache (its meta is a {type(cache['meta']).__name__}, "
                         f"not a mapping)")
    if cache["meta"].get("version") != CACHE_VERSION:
        raise ValueError(f"--load_awq {str(path)!r}: cache version {cache['meta'].get('version')!r}, "
                         f"this version reads {CACHE_VERSION}; rerun --run_awq")
    why = _structure_problem(cache)
    if why:
        raise ValueError(f"--load_awq {str(path)!r}: not an AWQ cache of this version ({why}); rerun --run_awq")
    return cache


def _structure_problem(cache: dict) -> str | None:
    """What is wrong with the layout of a cache of the current version (None when nothing)."""
    meta = cache["meta"]
    for key, typ in (("model", str), ("shapes", dict), ("layers", dict), ("format", dict)):
        if not isinstance(meta.get(key), typ):
            return f"meta.{key} is not a {typ.__name__}"
    if not {"dtype", "bits", "group_size", "double_quant"} <= set(meta["format"]):
        return "meta.format lacks dtype / bits / group_size / double_quant"
    if not isinstance(cache["scale"], dict) or not isinstance(cache["clip"], dict):
        return "scale / clip are not mappings"
    for name, e in cache["scale"].items():
        if not (isinstance(e, dict) and isinstance(e.get("layers"), list) and all(isinstance(n, str) for n in e["layers"])
                and isinstance(e.get("scales"), torch.Tensor)):
            return f"scale entry {name!r} lacks its layers / scales"
    for name, e in cache["clip"].items():
        if not (isinstance(e, dict) and isinstance(e.get("max_val"), torch.Tensor)
                and isinstance(e.get("group_size"), int)):
            return f"clip entry {name!r} lacks its max_val / group_size"
    return None


def check_cache_model(cache: dict, model_id: str, path: str = "cache") -> None:
    """Refuse a cache made for a model of another name (checked before the model loads)."""
    if cache["meta"]["model"] != model_id:
        raise ValueError(f"--load_awq {path!r} was made for model {cache['meta']['model']!r}, not {model_id!r}; "
                         f"rerun --run_awq for this model")


def check_cache(cache: dict, model: nn.Module, model_id: str, plan: QuantPlan, path: str = "cache") -> None:
    """Refuse a cache made for another model (name or layer shapes) or another weight format."""
    check_cache_model(cache, model_id, path)
    want = cache_meta(model, model_id, plan)
    have = cache["meta"]
    if have["shapes"] != want["shapes"]:
        diff = sorted(set(have["shapes"]) ^ set(want["shapes"])) or \
            [n for n in want["shapes"] if have["shapes"][n] != want["shapes"][n]]
        raise ValueError(f"--load_awq {path!r} was made for another model: its layers differ from this model's "
                         f"(first difference: {diff[0]!r}); rerun --run_awq for this model")
    if have["layers"] != want["layers"]:
        name = next(n for n in want["layers"] if have["layers"].get(n) != want["layers"][n])
        f = have["format"]
        raise ValueError(
            f"--load_awq {path!r} was made for another weight format ({f['dtype']} w{f['bits']} "
            f"g{f['group_size']}{' double-quant' if f['double_quant'] else ''}; {name}: {have['layers'].get(name)!r}) "
            f"than requested ({plan.w.dtype} w{plan.w.bits} g{plan.w.group_size}"
            f"{' double-quant' if plan.w.double_quant else ''}; {name}: {want['layers'][name]!r}); "
            f"pass the matching --w_bit/--q_group_size/--wq_dtype/--use_double_quant or rerun --run_awq")
