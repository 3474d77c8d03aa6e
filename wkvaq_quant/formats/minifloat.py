"""Elementwise rounding to small floating-point grids, computed exactly on fp32 tensors.

All helpers take `emin` (exponent of the smallest normal binade) and `man_bits`: in the binade
[2^e, 2^(e+1)) with e >= emin the step is 2^(e - man_bits); below 2^emin the step stays
2^(emin - man_bits) (subnormals, gradual underflow). Rounding modes differ per format.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pow2_floor", "round_half_up_", "round_rne_", "round_ties_down_"]

_EXP_MASK = 0x7F800000  # fp32 exponent field


def pow2_floor(y: Tensor) -> Tensor:
    """2^floor(log2 |y|) as a new fp32 tensor (0 for zero and for fp32 subnormals)."""
    return torch.bitwise_and(y.view(torch.int32), _EXP_MASK).view(torch.float32)


def _step(y: Tensor, man_bits: int, emin: int) -> Tensor:
    return pow2_floor(y).clamp_min_(2.0**emin).mul_(2.0**-man_bits)


def round_rne_(y: Tensor, man_bits: int, emin: int) -> Tensor:
    """In place: round to the grid, ties to even (IEEE round-to-nearest-even).

    (y + C) - C with C = 1.5 * 2^23 * step: the fp32 add rounds y to a multiple of `step`
    with the hardware's ties-to-even (C / step is even), and the subtraction is exact.
    """
    c = pow2_floor(y).clamp_min_(2.0**emin).mul_(1.5 * 2.0 ** (23 - man_bits))
    return y.add_(c).sub_(c)


def round_ties_down_(y: Tensor, man_bits: int, emin: int) -> Tensor:
    """In place: round to the grid, ties toward -inf (the lower neighbour)."""
    step = _step(y, man_bits, emin)
    z = y.div_(step)  # exact (power-of-two step)
    q = torch.round(z)  # RNE; z - q is exact and equals -1/2 where RNE broke a tie upward
    tie_up = z.sub_(q).eq_(-0.5)
    return torch.sub(q, tie_up, out=y).mul_(step)


def round_half_up_(y: Tensor, man_bits: int, emin: int) -> Tensor:
    """In place: round to the grid, ties toward +inf (for y >= 0: round half up)."""
    step = _step(y, man_bits, emin)
    z = y.div_(step)
    q = torch.round(z)  # z - q == +1/2 where RNE broke a tie downward
    tie_down = z.sub_(q).eq_(0.5)
    return torch.add(q, tie_down, out=y).mul_(step)
