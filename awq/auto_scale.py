"""AWQ scale search (arXiv 2306.00978, llm-awq `auto_scale.py`).

For a group of linears fed by one op, with x their recorded input and
x_mean[c] = mean over tokens of |x[:, c]|, try n_grid candidates

    s(alpha) = x_mean^alpha (floored at 1e-4),  s /= sqrt(max(s) * min(s)),  alpha = 0, 1/n, ..., (n-1)/n

quantize every linear as Q(W * s) / s (its own weight format and group size) and keep the
alpha with the lowest mean squared error of the inspected module's output (attention for
q/k/v, MLP for gate/up, the linear itself for o_proj / down_proj) against full precision.
alpha = 0 (s = 1) is plain RTN, so the search never does worse than RTN on the calibration data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from awq.features import BlockFeatures
from awq.structure import ScaleGroup
from wkvaq_quant.config import QuantArgs
from wkvaq_quant.quantize import fake_quantize

__all__ = ["ScaleSearch", "activation_mean", "search_scale"]


@dataclass(frozen=True)
class ScaleSearch:
    """The chosen scales (fp32, size = input channels) and the loss of every alpha tried."""

    scales: Tensor
    alpha: float
    losses: tuple[float, ...]


def activation_mean(xs: list[Tensor]) -> Tensor:
    """mean over all tokens of |x| per channel, fp32 ([C])."""
    c = xs[0].shape[-1]
    total = sum(x.reshape(-1, c).abs().float().sum(0) for x in xs)
    n = sum(x.numel() // c for x in xs)
    return total / n


@torch.no_grad()
def search_scale(block: nn.Module, group: ScaleGroup, feats: BlockFeatures, w_args: dict[str, QuantArgs],
                 n_grid: int = 20) -> ScaleSearch:
    """Grid search of the AWQ scales of `group` (see the module docstring)."""
    if n_grid <= 0:
        raise ValueError(f"n_grid must be positive, got {n_grid}")
    xs = feats.inputs[group.layers[0]]
    x_mean = activation_mean(xs)
    inspect = block.get_submodule(group.inspect)
    reference = [feats.call(inspect, group.inspect, b, x) for b, x in enumerate(xs)]
    n_out = sum(r.numel() for r in reference)
    linears: list[nn.Linear] = [block.get_submodule(n) for n in group.layers]
    originals = [lin.weight.detach().clone() for lin in linears]
    best_loss, best_alpha, best_scales = math.inf, -1.0, None
    losses = []
    try:
        for r in range(n_grid):
            alpha = r / n_grid
            s = x_mean.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for lin, w0, name in zip(linears, originals, group.layers):
                sw = s.to(w0.device, w0.dtype).view(1, -1)
                lin.weight.copy_(fake_quantize(w0 * sw, w_args[name]) / sw)
            sq = 0.0
            for b, x in enumerate(xs):
                sq += (feats.call(inspect, group.inspect, b, x).float() - reference[b].float()).pow(2).sum().item()
            loss = sq / n_out
            losses.append(loss)
            if loss < best_loss:
                best_loss, best_alpha, best_scales = loss, alpha, s.detach().float().cpu().clone()
    finally:
        for lin, w0 in zip(linears, originals):
            lin.weight.copy_(w0)
    if best_scales is None:
        raise RuntimeError(f"AWQ scale search for {group.layers}: every candidate gave a non-finite loss {losses}")
    return ScaleSearch(best_scales, best_alpha, tuple(losses))
