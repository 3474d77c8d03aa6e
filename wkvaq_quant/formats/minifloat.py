"""Elementwise rounding to small floating-point grids, computed exactly on fp32 tensors.

All helpers take `emin` (exponent of the smallest normal binade) and `man_bits`: in the binade
[2^e, 2^(e+1)) with e >= emin the step is 2^(e - man_bits); below 2^emin the step stays
2^(emin - man_bits) (subnormals, gradual underflow). Rounding modes differ per format.
`work` is an optional fp32 temporary shaped like `y` (allocated when None).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pow2_floor", "round_half_up_", "round_rne_", "round_ties_down_"]

_EXP_MASK = 0x7F800000  # fp32 exponent field


def pow2_floor(y: Tensor, out: Tensor | None = None) -> Tensor:
    """2^floor(log2 |y|) as fp32 (0 for zero and for fp32 subnormals); into `out` if given."""
    if out is None:
        return torch.bitwise_and(y.view(torch.int32), _EXP_MASK).view(torch.float32)
    torch.bitwise_and(y.view(torch.int32), _EXP_MASK, out=out.view(torch.int32))
    return out


def rne_offset(y: Tensor, man_bits: int, emin: int, out: Tensor | None = None) -> Tensor:
    """C = 1.5 * 2^23 * step(y): (y + C) - C rounds y to its grid step, ties to even."""
    return pow2_floor(y, out).clamp_min_(2.0**emin).mul_(1.5 * 2.0 ** (23 - man_bits))


def round_rne_(y: Tensor, man_bits: int, emin: int, work: Tensor | None = None) -> Tensor:
    """In place: round to the grid, ties to even (IEEE round-to-nearest-even).

    (y + C) - C with C = 1.5 * 2^23 * step: the fp32 add rounds y to a multiple of `step`
    with the hardware's ties-to-even (C / step is even), and the subtraction is exact.
    """
    c = rne_offset(y, man_bits, emin, work)
    return y.add_(c).sub_(c)


def _step(y: Tensor, man_bits: int, emin: int, out: Tensor | None) -> Tensor:
    return pow2_floor(y, out).clamp_min_(2.0**emin).mul_(2.0**-man_bits)


def round_ties_down_(y: Tensor, man_bits: int, emin: int, work: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """In place: round to the grid, ties toward -inf (the lower neighbour)."""
    w0, w1 = work if work is not None else (None, None)
    step = _step(y, man_bits, emin, w0)
    z = y.div_(step)  # exact (power-of-two step)
    q = torch.round(z) if w1 is None else torch.round(z, out=w1)  # RNE
    tie_up = z.sub_(q).eq_(-0.5)  # z - q is exact; -1/2 where RNE broke a tie upward
    return torch.sub(q, tie_up, out=y).mul_(step)


def round_half_up_(y: Tensor, man_bits: int, emin: int, work: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """In place: round to the grid, ties toward +inf (for y >= 0: round half up)."""
    w0, w1 = work if work is not None else (None, None)
    step = _step(y, man_bits, emin, w0)
    z = y.div_(step)
    q = torch.round(z) if w1 is None else torch.round(z, out=w1)  # z - q == +1/2: tie broken downward
    tie_down = z.sub_(q).eq_(0.5)
    return torch.add(q, tie_down, out=y).mul_(step)
