"""Folding AWQ scales into the previous op and clipping weights: the exact operations both the
search (on the fly) and `apply_awq` (from a cache) perform, so both give the same bits."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["clip_weight", "fold_scales"]


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear], scales: Tensor) -> None:
    """prev's output channels / s, each linear's input channels * s: exact in exact arithmetic.

    prev is a norm (weight and optional bias of size C) or a Linear whose last C output rows feed
    the linears.
    """
    c = scales.numel()
    for lin in linears:
        if lin.in_features != c:
            raise ValueError(f"AWQ scales of size {c} do not match a Linear with {lin.in_features} inputs")
    if isinstance(prev, nn.Linear):
        if prev.out_features < c:
            raise ValueError(f"AWQ scales of size {c} do not fit a previous Linear with {prev.out_features} outputs")
        w = prev.weight
        w[-c:].div_(scales.to(w.device, w.dtype).view(-1, 1))
        if prev.bias is not None:
            prev.bias[-c:].div_(scales.to(prev.bias.device, prev.bias.dtype))
    else:
        w = getattr(prev, "weight", None)
        if w is None or w.shape != (c,):
            raise ValueError(f"cannot fold AWQ scales of size {c} into {type(prev).__name__} "
                             f"(weight shape {None if w is None else tuple(w.shape)})")
        w.div_(scales.to(w.device, w.dtype))
        b = getattr(prev, "bias", None)
        if b is not None:
            b.div_(scales.to(b.device, b.dtype))
    for lin in linears:
        lin.weight.mul_(scales.to(lin.weight.device, lin.weight.dtype).view(1, -1))


@torch.no_grad()
def clip_weight(lin: nn.Linear, max_val: Tensor) -> None:
    """Clamp every group of `lin.weight` to [-m, m]; max_val is [out, n_groups] (groups along the
    input channels, all of equal size)."""
    co, ci = lin.weight.shape
    if max_val.dim() != 2 or max_val.shape[0] != co or ci % max_val.shape[1]:
        raise ValueError(f"AWQ clip values of shape {tuple(max_val.shape)} do not fit a weight of shape {(co, ci)}")
    ng = max_val.shape[1]
    # w [co, ci] -> [co, n_group, group_size]
    w = lin.weight.view(co, ng, ci // ng)
    m = max_val.to(w.device, w.dtype).unsqueeze(-1)
    torch.maximum(torch.minimum(w, m), -m, out=w)
