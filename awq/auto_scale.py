"""AWQ scale search (arXiv 2306.00978, llm-awq `auto_scale.py`).

For a group of linears fed by one op, with x their recorded input and
x_mean[c] = mean over tokens of |x[:, c]|, try n_grid candidates

    s(alpha) = x_mean^alpha (floored at 1e-4),  s /= sqrt(max(s) * min(s)),  alpha = 0, 1/n, ..., (n-1)/n

quantize every linear as Q(W * s) / s (its own weight format and group size) and keep the
alpha with the lowest mean squared error of the inspected module's output (attention for
q/k/v, MLP for gate/up, the linear itself for o_proj / down_proj) against full precision.
alpha = 0 (s = 1) is plain RTN, so the search never does worse than RTN on the calibration data.

The full-precision output of the attention / MLP is the one recorded in the block's forward
(BlockFeatures.outputs), not computed again. When the inspected module is the scaled Linear itself
(v -> o, up -> down), its output error is X D^T with D = Q(W * s) / s - W the weight change: computed
from D alone, without subtracting two nearly equal outputs, either directly per batch or, when
fewer multiply-adds, as mean_t (x_t D^T)^2 = sum(D G * D) / out with G = X^T X / n_tokens the
inputs' Gram matrix, formed once per group (tokens > in_features: always at llm-awq's 128 x 512).
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


def _candidate_scales(x_mean: Tensor, n_grid: int):
    """(alpha, s(alpha)) for alpha = 0, 1/n, ..., (n-1)/n (see the module docstring)."""
    for r in range(n_grid):
        alpha = r / n_grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        yield alpha, s / (s.max() * s.min()).sqrt()


class _LinearError:
    """Mean squared output error of a Linear whose weight changes by D, on the recorded inputs xs:
    mean over tokens and outputs of (x D^T)^2, per batch or through the Gram matrix of the inputs,
    whichever takes fewer multiply-adds for n_grid candidates (see the module docstring)."""

    def __init__(self, xs: list[Tensor], out_features: int, n_grid: int) -> None:
        c = xs[0].shape[-1]
        self.xs = [x.reshape(-1, c) for x in xs]
        self.n_tokens = sum(x.shape[0] for x in self.xs)
        self.out_features = out_features
        direct = n_grid * self.n_tokens * c * out_features
        gram = self.n_tokens * c * c + n_grid * c * c * out_features
        self.gram = None
        if gram < direct:
            g = torch.zeros(c, c, device=xs[0].device, dtype=torch.float32)
            for x in self.xs:
                xf = x.float()
                g.addmm_(xf.T, xf)
            self.gram = g.div_(self.n_tokens)

    def __call__(self, d: Tensor) -> float:
        if self.gram is not None:
            df = d.float()
            return float((df @ self.gram).mul_(df).sum()) / self.out_features
        sq = sum(float((x @ d.to(x.dtype).T).float().pow_(2).sum()) for x in self.xs)
        return sq / (self.n_tokens * self.out_features)


@torch.no_grad()
def search_scale(block: nn.Module, group: ScaleGroup, feats: BlockFeatures, w_args: dict[str, QuantArgs],
                 n_grid: int = 20) -> ScaleSearch:
    """Grid search of the AWQ scales of `group` (see the module docstring)."""
    if n_grid <= 0:
        raise ValueError(f"n_grid must be positive, got {n_grid}")
    xs = feats.inputs[group.layers[0]]
    x_mean = activation_mean(xs)
    linears: list[nn.Linear] = [block.get_submodule(n) for n in group.layers]
    if group.layers == (group.inspect,):
        return _search_linear(linears[0], group.layers, w_args[group.inspect], xs, x_mean, n_grid)
    inspect = block.get_submodule(group.inspect)
    reference = feats.outputs[group.inspect]
    n_out = sum(r.numel() for r in reference)
    originals = [lin.weight.detach().clone() for lin in linears]
    best_loss, best_alpha, best_scales = math.inf, -1.0, None
    losses = []
    try:
        for alpha, s in _candidate_scales(x_mean, n_grid):
            for lin, w0, name in zip(linears, originals, group.layers):
                sw = s.to(w0.device, w0.dtype).view(1, -1)
                lin.weight.copy_(fake_quantize(w0 * sw, w_args[name]) / sw)
            sq = 0.0
            for b, x in enumerate(xs):
                d = feats.call(inspect, group.inspect, b, x).float().sub_(reference[b].float())
                sq += float(d.pow_(2).sum())
            loss = sq / n_out
            losses.append(loss)
            if loss < best_loss:
                best_loss, best_alpha, best_scales = loss, alpha, s.detach().float().cpu().clone()
    finally:
        for lin, w0 in zip(linears, originals):
            lin.weight.copy_(w0)
    return _found(group.layers, best_scales, best_alpha, losses)


def _search_linear(lin: nn.Linear, layers: tuple[str, ...], args: QuantArgs, xs: list[Tensor], x_mean: Tensor, n_grid: int) -> ScaleSearch:
    """The scale search of a group whose inspected module is its only Linear: the loss from the
    weight change alone (_LinearError); the Linear is not modified."""
    w0 = lin.weight.detach()
    error = _LinearError(xs, lin.out_features, n_grid)
    best_loss, best_alpha, best_scales = math.inf, -1.0, None
    losses = []
    for alpha, s in _candidate_scales(x_mean, n_grid):
        sw = s.to(w0.device, w0.dtype).view(1, -1)
        loss = error(fake_quantize(w0 * sw, args) / sw - w0)
        losses.append(loss)
        if loss < best_loss:
            best_loss, best_alpha, best_scales = loss, alpha, s.detach().float().cpu().clone()
    return _found(layers, best_scales, best_alpha, losses)


def _found(layers: tuple[str, ...], scales: Tensor | None, alpha: float, losses: list[float]) -> ScaleSearch:
    if scales is None:
        raise RuntimeError(f"AWQ scale search for {layers}: every candidate gave a non-finite loss {losses}")
    return ScaleSearch(scales, alpha, tuple(losses))
