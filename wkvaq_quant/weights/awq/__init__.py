"""Activation-aware weight quantization (AWQ) with INT and BitMoD weights: the scale and clip
search (auto_scale, auto_clip), folding (apply), the search cache (cache) and the run over a
model's blocks (pre_quant). Registers `--weight_algo awq` (llmc `quant.method: Awq`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.weights.awq.pre_quant import awq_block, run_awq
from wkvaq_quant.weights.awq.settings import check_search_dtype
from wkvaq_quant.weights.blocks import BlockInputs
from wkvaq_quant.weights.registry import AlgoSpec, quantizes_linears, register_weight_algo
from wkvaq_quant.weights.rtn import rtn_quantize


def _run(model: nn.Module, plan: QuantPlan, algo: Any, calib: Tensor, device: str, progress: bool) -> QuantPlan:
    a = algo.awq
    run_awq(model, plan, calib, "", device, n_grid=a.n_grid, max_shrink=a.max_shrink, n_sample_token=a.n_sample_token,
            progress=progress, record_grids=False, search_dtype=a.search_dtype,
            weight_only_search=a.weight_only_search)
    return plan


def _layer_wise_block(model: nn.Module, index: int, block: nn.Module, prefix: str, inputs: BlockInputs,
                      plan: QuantPlan, algo: Any, device: torch.device | str) -> BlockInputs:
    a = algo.awq
    fp_out = awq_block(block, prefix, index, inputs, plan, device, a.n_grid, a.max_shrink, a.n_sample_token,
                       {"scale": {}, "clip": {}}, check_search_dtype(a.search_dtype), a.weight_only_search)
    rtn_quantize(model, plan, blocks={index})
    return fp_out


def _check_plan(algo: Any, plan: QuantPlan) -> None:
    if quantizes_linears(plan, 1) and not algo.awq.weight_only_search and algo.awq.search_dtype != "model":
        raise ValueError(f"--search_dtype {algo.awq.search_dtype} computes weight-only output changes, but the "
                         f"plan quantizes Linear inputs, which the AWQ search then sees quantized; allowed: "
                         f"--search_dtype model, or --awq_weight_only_search")


def _slug(algo: Any) -> str:
    wo = "-wos" if algo.awq.weight_only_search else ""
    return f"awq-g{algo.awq.n_grid}{wo}-n{algo.calib.n_samples}x{algo.calib.seq_len}"


# every block searches on the full-precision model's inputs, as llm-awq
register_weight_algo(AlgoSpec(name="awq", method="Awq", needs_calib=True, run=_run, block=_layer_wise_block,
                              settings="awq", next_inputs=lambda algo: "fp", fp_outputs_from_process=True, slug=_slug,
                              check_plan=_check_plan, uses_input_settings=lambda algo: not algo.awq.weight_only_search))
