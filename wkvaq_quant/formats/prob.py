"""Unsigned minifloats for attention probabilities (P in [0, 1]; no sign bit, no scale).

    bits=8:  E4M4, bias 15   normals [2^-14, 1.9375], subnormal step 2^-18
    bits=12: E5M7, bias 31   normals [2^-30, 1.9921875], subnormal step 2^-37
Bias = 2^E - 1, so the top binade is [1, 2) and 1.0 is exact; no inf/NaN codes.
Rounding: half up on the dropped mantissa bits (P3-LLM), carries into the exponent.
Underflow is gradual: below the smallest normal the step stays 2^(emin - M) (subnormals),
so values below half of it flush to 0. Negative inputs clamp to 0, values above the
maximum saturate. For P in FP16, E4M4 equals P3-LLM's "keep 4 mantissa bits, round half up"
(FP16 has the same smallest normal, 2^-14, and its subnormals keep the same step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from wkvaq_quant.formats.minifloat import round_half_up_
from wkvaq_quant.formats.registry import NumberFormat, QParams, Scratch, register_format

if TYPE_CHECKING:
    from wkvaq_quant.config import QuantArgs

__all__ = ["UFLOAT_SPECS", "UFloatFormat", "UFloatSpec", "round_ufloat_"]


@dataclass(frozen=True)
class UFloatSpec:
    exp_bits: int
    man_bits: int

    @property
    def bias(self) -> int:
        return 2**self.exp_bits - 1

    @property
    def emin(self) -> int:
        return 1 - self.bias

    @property
    def max_value(self) -> float:
        return 2.0 - 2.0**-self.man_bits


UFLOAT_SPECS = {8: UFloatSpec(exp_bits=4, man_bits=4), 12: UFloatSpec(exp_bits=5, man_bits=7)}


def round_ufloat_(y: Tensor, bits: int, work: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """In place: clamp to [0, max] and round to the unsigned `bits`-bit minifloat, half up."""
    spec = UFLOAT_SPECS[bits]
    return round_half_up_(y.clamp_(0.0, spec.max_value), spec.man_bits, spec.emin, work)


@register_format("ufloat")
class UFloatFormat(NumberFormat):
    bits = tuple(UFLOAT_SPECS)
    scaled = False

    def choose_qparams(self, g: Tensor, args: QuantArgs, scratch: Scratch | None = None) -> QParams:
        return QParams()

    def apply(self, g: Tensor, qp: QParams, args: QuantArgs, out: Tensor, scratch: Scratch | None = None) -> None:
        work = (Scratch.like(scratch, "work0", g), Scratch.like(scratch, "work1", g))
        round_ufloat_(out.copy_(g), args.bits, work)
