"""Scaled minifloat formats: FP8 E4M3 (OCP "fn": max 448, no inf) and FP4 E2M1 (max 6).

Per group s = amax / fmax, y = clamp(x / s, -fmax, fmax), x_hat = RNE(y) * s, where RNE
rounds to the format's grid (subnormals included) with ties to even. FP8 equals the round
trip y.to(torch.float8_e4m3fn).float(); the clamp is the format's saturation and only acts
when the scale was changed after it was chosen (double quantization).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from wkvaq_quant.formats.minifloat import round_rne_
from wkvaq_quant.formats.registry import NumberFormat, QParams, Scratch, register_format
from wkvaq_quant.formats.scale import floor_scale_

if TYPE_CHECKING:
    from wkvaq_quant.config import QuantArgs

__all__ = ["FP4_E2M1_VALUES", "Fp4E2M1Format", "Fp8E4M3Format", "group_amax", "round_fp4_e2m1_", "round_fp8_e4m3_"]

FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Non-negative FP4 E2M1 values (the format also has their negatives)."""


def group_amax(g: Tensor) -> Tensor:
    """max |g| over the last dim, keepdim (two reductions, no |g| temporary)."""
    return torch.maximum(g.amax(dim=-1, keepdim=True), g.amin(dim=-1, keepdim=True).neg_())


def round_fp8_e4m3_(y: Tensor, work: Tensor | None = None, saturate: bool = True) -> Tensor:
    """In place: saturate to +-448 and round to E4M3 (3 mantissa bits, emin -6), ties to even.

    saturate=False skips the clamp when |y| <= 448 * (1 + 2^-22) is known (then RNE gives <= 448).
    """
    if saturate:
        y.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return round_rne_(y, man_bits=3, emin=-6, work=work)


def round_fp4_e2m1_(y: Tensor, work: Tensor | None = None, saturate: bool = True) -> Tensor:
    """In place: saturate to +-6 and round to E2M1 (1 mantissa bit, emin 0), ties to even."""
    if saturate:
        y.clamp_(-FP4_E2M1_MAX, FP4_E2M1_MAX)
    return round_rne_(y, man_bits=1, emin=0, work=work)


class _ScaledFloat(NumberFormat):
    fmax: float = 1.0

    def choose_qparams(self, g: Tensor, args: QuantArgs, scratch: Scratch | None = None) -> QParams:
        return QParams(scale=floor_scale_(group_amax(g).div_(self.fmax)))

    def _round_(self, y: Tensor, work: Tensor, saturate: bool) -> Tensor:
        raise NotImplementedError

    def apply(self, g: Tensor, qp: QParams, args: QuantArgs, out: Tensor, scratch: Scratch | None = None) -> None:
        work = Scratch.like(scratch, "work", g)
        # with s = amax / fmax, |x / s| <= fmax (1 + 2^-22): saturation only matters once the
        # scale was replaced by its double-quantized value
        self._round_(torch.div(g, qp.scale, out=out), work, args.double_quant).mul_(qp.scale)


@register_format("fp8_e4m3")
class Fp8E4M3Format(_ScaledFloat):
    bits = (8,)
    fmax = FP8_E4M3_MAX

    def _round_(self, y: Tensor, work: Tensor, saturate: bool) -> Tensor:
        return round_fp8_e4m3_(y, work, saturate)


@register_format("fp4_e2m1")
class Fp4E2M1Format(_ScaledFloat):
    bits = (4,)
    fmax = FP4_E2M1_MAX

    def _round_(self, y: Tensor, work: Tensor, saturate: bool) -> Tensor:
        return round_fp4_e2m1_(y, work, saturate)
