"""Folding AWQ scales into the previous op and clipping weights: the exact operations both the
search (on the fly) and `apply_awq` (from a cache) perform, so both give the same bits."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["clip_weight", "fold_scales", "group_columns"]


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear], scales: Tensor, norm_offset: float = 0.0) -> None:
    """prev's output channels / s, each linear's input channels * s: exact in exact arithmetic.

    prev is a norm (weight and optional bias of size C) or a Linear (weight and bias) whose last C
    output rows feed the linears. A norm that multiplies by (norm_offset + w) (Gemma's RMSNorm:
    1 + w; the family's `Arch.norm_offset`) gets w' = (norm_offset + w) / s - norm_offset.
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
        if norm_offset:
            w.add_(norm_offset).div_(scales.to(w.device, w.dtype)).sub_(norm_offset)
        else:
            w.div_(scales.to(w.device, w.dtype))
        b = getattr(prev, "bias", None)
        if b is not None:
            b.div_(scales.to(b.device, b.dtype))
    for lin in linears:
        lin.weight.mul_(scales.to(lin.weight.device, lin.weight.dtype).view(1, -1))


def group_columns(in_features: int, group_size: int) -> Tensor:
    """Group index of every input column; the last group is shorter when group_size does not
    divide in_features (576 with 128 -> 4 groups of 128 and one of 64), as in fake_quantize."""
    gs = in_features if group_size == -1 else group_size
    return torch.arange(in_features) // gs


@torch.no_grad()
def clip_weight(lin: nn.Linear, max_val: Tensor, group_size: int) -> None:
    """Clamp every (output row, input group) of `lin.weight` to [-m, m]; max_val is [out, n_groups]."""
    co, ci = lin.weight.shape
    cols = group_columns(ci, group_size)
    if max_val.shape != (co, int(cols[-1]) + 1):
        raise ValueError(f"AWQ clip values of shape {tuple(max_val.shape)} do not fit a weight of shape {(co, ci)} "
                         f"with group size {group_size}")
    w = lin.weight
    m = max_val.to(w.device, w.dtype)[:, cols.to(w.device)]  # [co, n_group] -> [co, ci]
    torch.maximum(torch.minimum(w, m), -m, out=w)
