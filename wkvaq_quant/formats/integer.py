"""Uniform integer format: asymmetric with an int or float zero point, or symmetric.

Asymmetric, int zero point (AWQ/GPTQ), qmax = 2^b - 1:
    s = (max - min) / qmax,  z = clamp(round(-min / s), 0, qmax)
    x_hat = (clamp(round(x / s) + z, 0, qmax) - z) * s
Asymmetric, float zero point (KIVI / KCVT keys):
    s = (max - min) / qmax,  x_hat = clamp(round((x - min) / s), 0, qmax) * s + min
Symmetric, qmax = 2^(b-1) - 1, codes in [-qmax, qmax] (the code -2^(b-1) is unused):
    s = amax / qmax,  x_hat = clamp(round(x / s), -qmax, qmax) * s
round() is round-half-to-even (torch.round). A constant group (max == min) uses s = |min|
so it is reproduced exactly; scales are floored at SCALE_FLOOR.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from wkvaq_quant.formats.registry import NumberFormat, QParams, Scratch, register_format
from wkvaq_quant.formats.scale import floor_scale_

if TYPE_CHECKING:
    from wkvaq_quant.config import QuantArgs

__all__ = ["IntFormat"]


@register_format("int")
class IntFormat(NumberFormat):
    bits = tuple(range(1, 16))
    symmetric_modes = (False, True)
    default_symmetric = False

    def choose_qparams(self, g: Tensor, args: QuantArgs, scratch: Scratch | None = None) -> QParams:
        # g [rows, n_groups, group_size] -> parameters [rows, n_groups, 1]
        lo = g.amin(dim=-1, keepdim=True)
        hi = g.amax(dim=-1, keepdim=True)
        if args.symmetric:
            qmax = 2 ** (args.bits - 1) - 1
            s = floor_scale_(torch.maximum(hi, -lo).div_(qmax))
            return QParams(scale=s)
        qmax = 2**args.bits - 1
        s = torch.where(hi > lo, (hi - lo) / qmax, lo.abs())
        floor_scale_(s)
        if args.zero_point == "float":
            return QParams(scale=s, zero=lo)
        z = torch.round(-lo / s).clamp_(0, qmax)
        return QParams(scale=s, zero=z)

    def apply(self, g: Tensor, qp: QParams, args: QuantArgs, out: Tensor, scratch: Scratch | None = None) -> None:
        s, z = qp.scale, qp.zero
        if args.symmetric:
            qmax = 2 ** (args.bits - 1) - 1
            torch.div(g, s, out=out).round_().clamp_(-qmax, qmax).mul_(s)
            return
        qmax = 2**args.bits - 1
        if args.zero_point == "float":
            torch.sub(g, z, out=out).div_(s).round_().clamp_(0, qmax).mul_(s).add_(z)
            return
        _apply_int_zero(g, s, -z, qmax - z, out)

    def bind(self, qp: QParams, args: QuantArgs) -> Callable[[Tensor, Tensor], None]:
        if args.symmetric or args.zero_point == "float":
            return super().bind(qp, args)
        s, lo, hi = qp.scale, -qp.zero, 2**args.bits - 1 - qp.zero  # the code bounds, once
        return lambda g, out: _apply_int_zero(g, s, lo, hi, out)


def _apply_int_zero(g: Tensor, s: Tensor, lo: Tensor, hi: Tensor, out: Tensor) -> None:
    """Asymmetric INT with an integer zero point z: clamp(round(x/s) + z, 0, qmax) - z equals
    clamp(round(x/s), lo, hi) with lo = -z, hi = qmax - z (z integral); maximum / minimum with
    per-group bounds (a tensor-bounded clamp is ~10x slower on CPU)."""
    torch.div(g, s, out=out).round_()
    torch.maximum(out, lo, out=out)
    torch.minimum(out, hi, out=out).mul_(s)
