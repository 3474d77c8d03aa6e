"""`run_awq` (search, block by block, on calibration data) and `apply_awq` (from a cache).

run_awq visits the decoder blocks in order, one on `device` at a time. For each block it runs
the full-precision block over the captured inputs recording every Linear's input, searches the
scales of each group (auto_scale), folds them in, divides the recorded inputs by them, searches
the clip values of every Linear but q/k (auto_clip) and clamps the weights. The next block sees
the full-precision block's outputs (recorded in that same forward), as in llm-awq. The model is
left scaled and clipped (not quantized); `wkvaq_quant.weights.rtn.rtn_quantize` quantizes it
afterwards.

Linears whose weight setting is off (`plan.linear_args(...)[0]` at 16 bits, e.g. through a
mix_bits map) are neither scaled nor clipped: a scale group is skipped when any of its linears,
or the Linear its scale folds into (v_proj, up_proj), is off, since folding would change that
linear's weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from wkvaq_quant.arch import arch_of
from wkvaq_quant.weights.awq.apply import clip_weight, fold_scales
from wkvaq_quant.weights.awq.auto_clip import search_clip
from wkvaq_quant.weights.awq.auto_scale import search_scale
from wkvaq_quant.weights.awq.cache import cache_meta
from wkvaq_quant.weights.awq.features import collect_features
from wkvaq_quant.weights.awq.settings import check_search_dtype
from wkvaq_quant.weights.awq.structure import block_parts, clip_skip, scale_groups
from wkvaq_quant.config import QuantArgs
from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.modeling.attach import block_linears
from wkvaq_quant.weights.blocks import BlockInputs, capture_block_inputs, for_each_block, run_block
from wkvaq_quant.weights.rtn import rtn_quantize

__all__ = ["apply_awq", "awq_block", "run_awq"]


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


@torch.no_grad()
def awq_block(block: nn.Module, prefix: str, index: int, inputs: BlockInputs, plan: QuantPlan,
               device: torch.device | str, n_grid: int, max_shrink: float, n_sample_token: int,
               out: dict[str, Any], search_dtype: torch.dtype | None = None,
               weight_only_search: bool = False) -> BlockInputs:
    """Search and fold the scales, then search and apply the clips, of decoder block `index`
    (module name `prefix`) on its inputs, in place; the entries go into out["scale"] / out["clip"].
    Returns the block's full-precision outputs (the next block's inputs, as in llm-awq), recorded
    in the forward that records the Linears' inputs. Where the plan quantizes a Linear's input, the
    scale and clip searches see it quantized (llmc's Awq with an `act` section), unless
    `weight_only_search`."""
    attn, mlp = block_parts(block)
    lin_names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and n.startswith((attn, mlp))]
    w_args: dict[str, QuantArgs] = {n: plan.linear_args(index, n.rsplit(".", 1)[-1])[0] for n in lin_names}
    a_args: dict[str, QuantArgs] = {} if weight_only_search else {
        n: a for n in lin_names if (a := plan.linear_args(index, n.rsplit(".", 1)[-1])[1]).enabled}
    # a group is searched only when every linear it changes (its own, and a previous Linear) is quantized
    groups = [g for g in scale_groups(block)
              if all(w_args[n].enabled for n in g.layers) and w_args.get(g.prev, w_args[g.layers[0]]).enabled]
    if not any(a.enabled for a in w_args.values()):
        return run_block(block, inputs, device)
    feats = collect_features(block, inputs, device, lin_names, [attn, mlp], linear_outputs=search_dtype is not None)
    norm_offset = arch_of(block).norm_offset
    for g in groups:
        found = search_scale(block, g, feats, w_args, n_grid, search_dtype, a_args)
        fold_scales(block.get_submodule(g.prev), [block.get_submodule(n) for n in g.layers], found.scales,
                    norm_offset)
        feats.divide_inputs(g.layers, found.scales)
        out["scale"][f"{prefix}.{g.prev}"] = {"layers": [f"{prefix}.{n}" for n in g.layers], "scales": found.scales,
                                              "alpha": found.alpha}
    skip = clip_skip(block)
    for n in lin_names:
        if not w_args[n].enabled or n.rsplit(".", 1)[-1] in skip:
            continue
        lin = block.get_submodule(n)
        max_val = search_clip(lin.weight, feats.inputs[n], w_args[n], n_grid, max_shrink, n_sample_token,
                              a_args=a_args.get(n)).cpu()
        clip_weight(lin, max_val, w_args[n].group_size)
        out["clip"][f"{prefix}.{n}"] = {"max_val": max_val, "group_size": w_args[n].group_size}
    return inputs.with_hidden(feats.block_outputs)


def run_awq(model: nn.Module, plan: QuantPlan, calib_ids: Tensor, model_id: str, device: torch.device | str = "cpu",
            n_grid: int = 20, max_shrink: float = 0.5, n_sample_token: int = 512, batch_size: int = 1,
            progress: bool = True, record_grids: bool = True, search_dtype: str = "model",
            weight_only_search: bool = False) -> dict[str, Any]:
    """Search AWQ scales and clips on `calib_ids` [n, T]; returns the cache
    {"scale", "clip", "grid", "meta"} (see wkvaq_quant.weights.awq.cache; "grid" only with `record_grids`, which
    quantizes a copy of every weight once more). The model is left scaled and clipped.
    `search_dtype`: see wkvaq_quant.weights.awq.settings.AWQ_SEARCH_DTYPES."""
    if n_grid <= 0 or not 0 <= max_shrink < 1 or n_sample_token <= 0:
        raise ValueError(f"n_grid {n_grid} (> 0), max_shrink {max_shrink} (in [0, 1)), n_sample_token "
                         f"{n_sample_token} (> 0)")
    low = check_search_dtype(search_dtype)
    names = _module_names(model)
    out: dict[str, Any] = {"scale": {}, "clip": {}}
    inputs = capture_block_inputs(model, calib_ids, device, batch_size)

    def process(i: int, block: nn.Module, block_inputs: BlockInputs) -> BlockInputs:
        return awq_block(block, names[id(block)], i, block_inputs, plan, device, n_grid, max_shrink, n_sample_token,
                         out, low, weight_only_search)

    for_each_block(model, inputs, process, device, next_inputs="fp", progress=progress, desc="AWQ blocks",
                   fp_outputs_from_process=True)
    out["grid"] = _grids_after(model, plan, device) if record_grids else {}
    out["meta"] = cache_meta(model, model_id, plan, {
        "n_grid": n_grid, "max_shrink": max_shrink, "n_sample_token": n_sample_token, "search_dtype": search_dtype,
        "n_calib": int(calib_ids.shape[0]), "calib_seq_len": int(calib_ids.shape[1])})
    return out


def _grids_after(model: nn.Module, plan: QuantPlan, device: torch.device | str) -> dict[str, Tensor]:
    """The per-group grids the final (scaled, clipped) weights get, without changing the model."""
    saved = {name: lin.weight.detach().clone() for _, _, name, lin in block_linears(model)}
    grids = rtn_quantize(model, plan, device)
    with torch.no_grad():
        for _, _, name, lin in block_linears(model):
            lin.weight.copy_(saved[name])
    return grids


@torch.no_grad()
def apply_awq(model: nn.Module, cache: dict[str, Any]) -> None:
    """Fold the cached scales and clamp the cached clip values into `model` (in place, in the
    order the search applied them: scales, then clips)."""
    modules = dict(model.named_modules())
    missing = [n for e in cache["scale"].items() for n in (e[0], *e[1]["layers"]) if n not in modules]
    missing += [n for n in cache["clip"] if n not in modules]
    if missing:
        raise ValueError(f"AWQ cache names modules this model does not have: {missing[:3]}")
    offset = arch_of(model).norm_offset
    for prev, entry in cache["scale"].items():
        fold_scales(modules[prev], [modules[n] for n in entry["layers"]], entry["scales"], offset)
    for name, entry in cache["clip"].items():
        clip_weight(modules[name], entry["max_val"], entry["group_size"])
