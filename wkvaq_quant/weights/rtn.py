"""Round-to-nearest fake quantization of every decoder Linear, per its own settings
(`plan.linear_args`), in place, optionally recording the BitMoD grid chosen for each group."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.modeling.attach import block_linears
from wkvaq_quant.quantize import quantize
from wkvaq_quant.weights.registry import AlgoSpec, register_weight_algo, run_nothing

__all__ = ["rtn_quantize"]


@torch.no_grad()
def rtn_quantize(model: nn.Module, plan: QuantPlan, device: torch.device | str | None = None,
                 blocks: set[int] | None = None) -> dict[str, Tensor]:
    """Fake-quantize each enabled decoder Linear's weight in place (on `device` when given, one
    Linear at a time), only in the decoder blocks `blocks` when given. Returns the chosen per-group
    grid ids [out, n_groups] (uint8, CPU) of every Linear whose format picks a grid per group
    (BitMoD); disabled Linears are left untouched."""
    grids: dict[str, Tensor] = {}
    for block, short, name, lin in block_linears(model):
        if blocks is not None and block not in blocks:
            continue
        w_args = plan.linear_args(block, short)[0]
        if not w_args.enabled:
            continue
        w = lin.weight if device is None else lin.weight.to(device)
        res = quantize(w, w_args)
        lin.weight.copy_(res.x_hat)
        if res.grid is not None:
            grids[name] = res.grid.to(device="cpu", dtype=torch.uint8)
    return grids


register_weight_algo(AlgoSpec(name="rtn", method="RTN", needs_calib=False, run=run_nothing))
