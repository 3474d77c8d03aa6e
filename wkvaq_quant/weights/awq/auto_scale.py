"""AWQ scale search (arXiv 2306.00978, llm-awq `auto_scale.py`).

For a group of linears fed by one op, with x their recorded input and
x_mean[c] = mean over tokens of |x[:, c]|, try n_grid candidates

    s(alpha) = x_mean^alpha (floored at 1e-4),  s /= sqrt(max(s) * min(s)),  alpha = 0, 1/n, ..., (n-1)/n

quantize every linear as Q(W * s) / s (its own weight format and group size) and keep the
alpha with the lowest mean squared error of the inspected module's output (attention for
q/k/v, MLP for gate/up, the linear itself for o_proj / down_proj) against full precision.
alpha = 0 (s = 1) is plain RTN, so the search never does worse than RTN on the calibration data.

With quantized Linear inputs (llmc's `method: Awq` with an `act` section), a group Linear sees
Q_a(x / s) during the search (its own activation setting), so the loss measures the weight and
the activation error together, as llmc's search_scale_subset does; the Linears inside the inspected
module that are not in the group run as recorded, as in llmc.

The full-precision output of the attention / MLP is the one recorded in the block's forward
(BlockFeatures.outputs), not computed again. When the inspected module is the scaled Linear itself
(v -> o, up -> down), its output error is X D^T with D = Q(W * s) / s - W the weight change: computed
from D alone, without subtracting two nearly equal outputs, either directly per batch or, when
fewer multiply-adds, as mean_t (x_t D^T)^2 = sum(D G * D) / out with G = X^T X / n_tokens the
inputs' Gram matrix, formed once per group (tokens > in_features: always at llm-awq's 128 x 512).

With a lower `search_dtype` (--search_dtype bfloat16 / float16) the attention / MLP forwards of the
search compute only each Linear's output *change* in that dtype, on top of its recorded output
(_Perturbed): the rounding of the lower dtype touches the change, a few percent of the output,
and the products run at that dtype's speed (AMX on CPUs, tensor cores on GPUs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wkvaq_quant.weights.awq.features import BlockFeatures
from wkvaq_quant.weights.awq.structure import ScaleGroup
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
    mean over tokens and outputs of (x D^T)^2, per batch (products in `dtype`, default the inputs')
    or through the Gram matrix of the inputs (float32), whichever takes fewer multiply-adds for
    n_grid candidates (see the module docstring)."""

    def __init__(self, xs: list[Tensor], out_features: int, n_grid: int, dtype: torch.dtype | None = None) -> None:
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
        elif dtype is not None:
            self.xs = [x.to(dtype) for x in self.xs]

    def __call__(self, d: Tensor) -> float:
        if self.gram is not None:
            df = d.float()
            return float((df @ self.gram).mul_(df).sum()) / self.out_features
        sq = sum(float((x @ d.to(x.dtype).T).float().pow_(2).sum()) for x in self.xs)
        return sq / (self.n_tokens * self.out_features)


class _Perturbed:
    """The search of a group in a lower `dtype` (--search_dtype): while it is open, every Linear
    inside the inspected module returns its recorded full-precision output y_ref plus the change of
    that output, with the product in `dtype` (float32 accumulation):

        a Linear of the group (fed by its recorded input x_ref):   y_ref + x_ref (W' - W)^T
        a Linear after them (o_proj, down_proj; its input changed): y_ref + (x - x_ref) W^T

    Only the change, a few percent of the output, carries the lower precision's rounding; the
    attention, activation and the rest run as before. `set_weight` gives a group Linear its
    candidate weight W' (the module's own weight is not touched).

    When the inspected module returns a Linear's output itself (o_proj in attention, down_proj in
    the MLP: the recorded tensors are the same), that Linear returns only its output change
    (x - x_ref) W^T, which is the module's output error: `output_is_change` is then True and the
    caller takes its squares without subtracting the reference."""

    def __init__(self, inspect: nn.Module, inspect_name: str, layers: tuple[str, ...], feats: BlockFeatures,
                 dtype: torch.dtype) -> None:
        self.batch = 0
        self.dtype = dtype
        self.feats = feats
        self.delta: dict[str, Tensor] = {}
        self.patched: list[nn.Linear] = []
        self.output_is_change = False
        shared: dict[int, list[Tensor]] = {}  # q/k/v (gate/up) share one input: one low-precision copy
        self.x_low: dict[str, list[Tensor]] = {}
        for rel, lin in inspect.named_modules():
            if not isinstance(lin, nn.Linear):
                continue
            name = f"{inspect_name}.{rel}"
            if name in layers:
                xs = feats.inputs[name]
                self.x_low[name] = shared.setdefault(xs[0].data_ptr(), [x.to(dtype) for x in xs])
                lin.forward = self._changed_weight(name)
            else:
                tail = _same_tensors(feats.linear_outputs[name], feats.outputs[inspect_name])
                self.output_is_change = self.output_is_change or tail
                lin.forward = self._changed_input(name, lin.weight.detach().to(dtype), tail)
            self.patched.append(lin)
        missing = [n for n in layers if n not in self.x_low]
        if missing:
            self.close()
            raise ValueError(f"--search_dtype: {missing} are not inside {inspect_name}")

    def _changed_weight(self, name: str):
        def forward(x: Tensor) -> Tensor:
            b = self.batch
            if x.data_ptr() != self.feats.inputs[name][b].data_ptr():
                raise RuntimeError(f"AWQ --search_dtype: {name} was not fed its recorded input")
            # cast, then add in place: a mixed-dtype add into a new tensor is several times slower on CPU
            y_ref = self.feats.linear_outputs[name][b]
            return F.linear(self.x_low[name][b], self.delta[name]).to(y_ref.dtype).add_(y_ref)
        return forward

    def _changed_input(self, name: str, w_low: Tensor, change_only: bool):
        def forward(x: Tensor) -> Tensor:
            b = self.batch
            dy = F.linear(torch.sub(x, self.feats.inputs[name][b]).to(self.dtype), w_low)
            if change_only:
                return dy
            y_ref = self.feats.linear_outputs[name][b]
            return dy.to(y_ref.dtype).add_(y_ref)
        return forward

    def set_weight(self, name: str, w: Tensor, w0: Tensor) -> None:
        self.delta[name] = (w - w0).to(self.dtype)

    def close(self) -> None:
        for lin in self.patched:
            del lin.forward
        self.patched = []


def _same_tensors(a: list[Tensor], b: list[Tensor]) -> bool:
    """Whether the recorded lists hold the very same tensors (same memory, shape and strides)."""
    return len(a) == len(b) and all(x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride()
                                    for x, y in zip(a, b))


def _quantized_input(x: Tensor, s: Tensor, args: QuantArgs) -> Tensor:
    """What a Linear whose weight was scaled by s sees of its input x, in x's scale: Q_a(x / s) * s
    (the candidate weights are Q(W * s) / s, so the product is Q_a(x / s) . Q(W * s)^T)."""
    sw = s.to(x.device, x.dtype).view(1, -1)
    return fake_quantize(x / sw, args) * sw


@torch.no_grad()
def search_scale(block: nn.Module, group: ScaleGroup, feats: BlockFeatures, w_args: dict[str, QuantArgs],
                 n_grid: int = 20, search_dtype: torch.dtype | None = None,
                 a_args: dict[str, QuantArgs] | None = None) -> ScaleSearch:
    """Grid search of the AWQ scales of `group` (see the module docstring). With `search_dtype`, the
    changes of the Linears' outputs are computed in that dtype (_Perturbed; `feats` must hold the
    Linears' outputs), otherwise everything runs in the model's dtype.

    `a_args`: the input-activation settings of the Linears (llmc's `method: Awq` with an `act`
    section): a group Linear whose input is quantized sees Q_a(x / s) during the search, so each
    candidate's loss holds its weight and its activation error (llmc's search_scale_subset)."""
    if n_grid <= 0:
        raise ValueError(f"n_grid must be positive, got {n_grid}")
    acts = {n: a for n, a in (a_args or {}).items() if n in group.layers and a.enabled}
    if acts and search_dtype is not None:
        raise ValueError("an activation-aware AWQ search (quantized Linear inputs) runs in the model's dtype; "
                         "allowed: --search_dtype model, or --awq_weight_only_search")
    xs = feats.inputs[group.layers[0]]
    linears: list[nn.Linear] = [block.get_submodule(n) for n in group.layers]
    if acts and group.layers == (group.inspect,):
        return _search_linear_with_inputs(group, linears[0], xs, w_args[group.layers[0]], acts[group.layers[0]],
                                          n_grid)
    # the model's dtype with a non-Linear inspected module sets the candidates into the Linears: keep copies
    in_place = search_dtype is None and group.layers != (group.inspect,)
    originals = [lin.weight.detach().clone() if in_place else lin.weight.detach() for lin in linears]

    def candidates(s: Tensor):
        """(name, Linear, its weight W, Q(W * s) / s) for every Linear of the group."""
        for name, lin, w0 in zip(group.layers, linears, originals):
            sw = s.to(w0.device, w0.dtype).view(1, -1)
            yield name, lin, w0, fake_quantize(w0 * sw, w_args[name]) / sw

    if group.layers == (group.inspect,):  # the loss from the weight change alone; the Linear is not modified
        error = _LinearError(xs, linears[0].out_features, n_grid, search_dtype)
        return _grid_search(group.layers, xs, n_grid, lambda s: error(next(wq - w0 for *_, w0, wq in candidates(s))))
    inspect = block.get_submodule(group.inspect)
    reference = feats.outputs[group.inspect]
    n_out = sum(r.numel() for r in reference)
    perturbed = None if in_place else _Perturbed(inspect, group.inspect, group.layers, feats, search_dtype)

    current: list[Tensor] = []  # the candidate s, for the input quantizers
    hooks = [lin.register_forward_pre_hook(lambda _m, args, a=acts[name]: (_quantized_input(args[0], current[0], a),
                                                                            *args[1:]))
             for name, lin in zip(group.layers, linears) if name in acts]

    def loss(s: Tensor) -> float:
        current[:] = [s]
        for name, lin, w0, wq in candidates(s):
            if perturbed is None:
                lin.weight.copy_(wq)
            else:
                perturbed.set_weight(name, wq, w0)
        sq = 0.0
        for b, x in enumerate(xs):
            if perturbed is not None:
                perturbed.batch = b
            d = feats.call(inspect, group.inspect, b, x).float()
            if perturbed is None or not perturbed.output_is_change:
                d = d.sub_(reference[b].float())
            sq += float(d.pow_(2).sum())
        return sq / n_out

    try:
        return _grid_search(group.layers, xs, n_grid, loss)
    finally:
        for h in hooks:
            h.remove()
        if perturbed is not None:
            perturbed.close()
        else:
            for lin, w0 in zip(linears, originals):
                lin.weight.copy_(w0)


def _search_linear_with_inputs(group: ScaleGroup, lin: nn.Linear, xs: list[Tensor], w_args: QuantArgs,
                               a_args: QuantArgs, n_grid: int) -> ScaleSearch:
    """A Linear-only group (v -> o, up -> down) whose input is quantized: the loss of s is the mean
    squared difference of Q_a(x / s) . Q(W * s)^T from x W^T, per batch (no weight-change shortcut:
    the input changes too)."""
    w0 = lin.weight.detach()
    refs = [F.linear(x, w0) for x in xs]
    n_out = sum(r.numel() for r in refs)

    def loss(s: Tensor) -> float:
        sw = s.to(w0.device, w0.dtype).view(1, -1)
        wq = fake_quantize(w0 * sw, w_args)
        return sum(float((F.linear(fake_quantize(x / sw.to(x.dtype), a_args), wq) - r).float().pow_(2).sum())
                   for x, r in zip(xs, refs)) / n_out

    return _grid_search(group.layers, xs, n_grid, loss)


def _grid_search(layers: tuple[str, ...], xs: list[Tensor], n_grid: int, loss_of) -> ScaleSearch:
    """Try every candidate s(alpha) of the inputs `xs` and keep the one with the lowest
    `loss_of(s)` (the first on ties)."""
    best_loss, best_alpha, best_scales = math.inf, -1.0, None
    losses = []
    for alpha, s in _candidate_scales(activation_mean(xs), n_grid):
        loss = loss_of(s)
        losses.append(loss)
        if loss < best_loss:
            best_loss, best_alpha, best_scales = loss, alpha, s.detach().float().cpu().clone()
    if best_scales is None:
        raise RuntimeError(f"AWQ scale search for {layers}: every candidate gave a non-finite loss {losses}")
    return ScaleSearch(best_scales, best_alpha, tuple(losses))
