"""BitMoD (arXiv 2411.11745): per group, the best of four small grids with one special value.

3-bit base {0, +-1, +-2, +-4};  4-bit base {0, +-1, +-2, +-3, +-4, +-6, +-8, +-12} (FP4 E2M1 x2).
Each grid adds one extra value; the candidates, in index order (the stored grid id):
    0: +ER  1: -ER  (extra resolution: +-3 for 3-bit, +-10 for 4-bit)
    2: +EA  3: -EA  (extra asymmetry:  +-6 for 3-bit, +-16 for 4-bit)
Each candidate k scales the group so amax maps to its largest magnitude M_k
(s_k = amax / M_k: 4 or 6 for 3-bit, 12 or 16 for 4-bit), rounds y = x / s_k to the nearest
grid value (ties toward the lower value, as BitMoD's reference quantizer), and scores
SSE_k = s_k^2 * sum (y - q)^2. The group keeps argmin_k SSE_k (ties: lowest index). Zero point 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from wkvaq_quant.formats.floating import group_amax
from wkvaq_quant.formats.minifloat import rne_offset, round_ties_down_
from wkvaq_quant.formats.registry import NumberFormat, QParams, Scratch, register_format
from wkvaq_quant.formats.scale import floor_scale_

if TYPE_CHECKING:
    from wkvaq_quant.config import QuantArgs

__all__ = ["BITMOD_GRIDS", "BitModFormat", "bitmod_grid"]


@dataclass(frozen=True)
class _Base:
    man_bits: int  # the base grid is a minifloat: step 2^(e - man_bits) in binade 2^e
    emin: int  # smallest normal binade; below it the step is 2^(emin - man_bits)
    vmax: float  # largest base magnitude
    values: tuple[float, ...]  # non-negative base values
    extras: tuple[float, float]  # (ER, EA) special magnitudes


_BASES = {
    3: _Base(man_bits=0, emin=0, vmax=4.0, values=(0.0, 1.0, 2.0, 4.0), extras=(3.0, 6.0)),
    4: _Base(man_bits=1, emin=1, vmax=12.0, values=(0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0), extras=(10.0, 16.0)),
}


@dataclass(frozen=True)
class _Candidate:
    extra: float  # the signed special value
    fmax: float  # largest magnitude of the grid (amax maps to it)
    lo: float  # y in (lo, hi] rounds to `extra` (nearest, ties toward the lower value)
    hi: float


def _candidates(base: _Base) -> tuple[_Candidate, ...]:
    out = []
    for mag in base.extras:
        below = max(v for v in base.values if v < mag)
        above = min((v for v in base.values if v > mag), default=math.inf)
        lo, hi = (below + mag) / 2, (mag + above) / 2
        fmax = max(base.vmax, mag)
        out.append(_Candidate(mag, fmax, lo, hi))  # +extra: (lo, hi]
        out.append(_Candidate(-mag, fmax, -hi, -lo))  # -extra: (-hi, -lo]
    return tuple(out)


_CANDIDATES = {bits: _candidates(b) for bits, b in _BASES.items()}


def bitmod_grid(bits: int, index: int) -> tuple[float, ...]:
    """All values of candidate grid `index` (0..3) for `bits` (3 or 4), sorted."""
    base, cand = _BASES[bits], _CANDIDATES[bits][index]
    vals = {v for v in base.values} | {-v for v in base.values} | {cand.extra}
    return tuple(sorted(vals))


BITMOD_GRIDS: dict[int, tuple[tuple[float, ...], ...]] = {
    bits: tuple(bitmod_grid(bits, k) for k in range(4)) for bits in _BASES
}
"""bits -> the four candidate grids, indexed by the stored grid id."""


def _in_interval_(y: Tensor, lo: float | Tensor, hi: float | Tensor, out: Tensor, work: Tensor) -> Tensor:
    """out = 1.0 where lo < y <= hi, else 0.0 (fp32 masks: bool outputs are much slower on CPU)."""
    torch.gt(y, lo, out=out)
    return out.mul_(torch.le(y, hi, out=work))


@register_format("bitmod")
class BitModFormat(NumberFormat):
    bits = (3, 4)

    def choose_qparams(self, g: Tensor, args: QuantArgs, scratch: Scratch | None = None) -> QParams:
        base, cands = _BASES[args.bits], _CANDIDATES[args.bits]
        y, eb, t = (Scratch.like(scratch, n, g) for n in ("y", "eb", "t"))
        amax = group_amax(g)  # [rows, n_groups, 1]
        errs, scales = [], []
        for fam in (cands[0:2], cands[2:4]):  # the two candidates of a family share a scale
            s = floor_scale_(amax / fam[0].fmax)
            torch.div(g, s, out=y)
            # base grid, nearest (ties do not change the error, so the cheap RNE (y + C) - C)
            c_rne = rne_offset(y, base.man_bits, base.emin, out=t)
            torch.add(y, c_rne, out=eb).sub_(c_rne).clamp_(-base.vmax, base.vmax)
            eb.sub_(y).square_()  # squared error of the base grid
            sse_base = eb.sum(dim=-1, keepdim=True)
            for c in fam:
                # adding the extra value e changes an element's error to min((y - e)^2, eb)
                gain = torch.sub(y, c.extra, out=t).square_().sub_(eb).clamp_max_(0.0)
                errs.append((sse_base + gain.sum(dim=-1, keepdim=True)).mul_(s * s))
            scales.append(s)
        grid = torch.argmin(torch.cat(errs, dim=-1), dim=-1, keepdim=True)  # [rows, n_groups, 1]
        scale = torch.where(grid < 2, scales[0], scales[1])
        return QParams(scale=scale, grid=grid.to(torch.int8))

    def apply(self, g: Tensor, qp: QParams, args: QuantArgs, out: Tensor, scratch: Scratch | None = None) -> None:
        self._apply(g, qp, args, self._grid_values(qp, args), out, scratch)

    def bind(self, qp: QParams, args: QuantArgs) -> Callable[[Tensor, Tensor], None]:
        values, scratch = self._grid_values(qp, args), Scratch()  # the groups' grid values, once
        return lambda g, out: self._apply(g, qp, args, values, out, scratch)

    @staticmethod
    def _grid_values(qp: QParams, args: QuantArgs) -> tuple[Tensor, Tensor, Tensor]:
        """Per group (extra value, lo, hi) of its chosen grid, each [rows, n_groups, 1]."""
        table = torch.tensor([[c.extra, c.lo, c.hi] for c in _CANDIDATES[args.bits]], dtype=torch.float32,
                             device=qp.scale.device)
        per_group = table[qp.grid.long().squeeze(-1)]  # [rows, n_groups, 3]
        return tuple(per_group[..., i : i + 1] for i in range(3))

    @staticmethod
    def _apply(g: Tensor, qp: QParams, args: QuantArgs, values: tuple[Tensor, Tensor, Tensor], out: Tensor,
               scratch: Scratch | None) -> None:
        base = _BASES[args.bits]
        extra, lo, hi = values
        take, w0, w1 = (Scratch.like(scratch, n, g) for n in ("eb", "t", "y"))
        y = torch.div(g, qp.scale, out=out)
        _in_interval_(y, lo, hi, take, w0)
        round_ties_down_(y, base.man_bits, base.emin, (w0, w1)).clamp_(-base.vmax, base.vmax)
        torch.lerp(y, extra.expand_as(y), take, out=out).mul_(qp.scale)  # take in {0, 1}: exact
