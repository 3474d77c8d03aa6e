"""GPTQ (Frantar et al., arXiv 2210.17323): quantize a Linear's weight column by column, spreading
each column's rounding error over the columns not yet quantized through the inverse Hessian of
the layer's inputs.

For a Linear with weight W [out, in] and calibration inputs X [n, in]:

    H    = 2/n * X^T X  (+ percdamp * mean(diag H) * I)
    Hinv = upper Cholesky factor of H^-1
    for column i:  q = Q(w_i);  err = (w_i - q) / Hinv[i, i];  W[:, i:] -= err * Hinv[i, i:]

with lazy batch updates (the columns of one block of `blocksize` are updated at once, the rest
of W once per block). Group parameters (scale, zero, BitMoD grid) are chosen from the current,
error-updated columns of a group when the group starts (blocks are cut so that a group starting
inside a block ends inside it, so these columns hold every update), or, with `static_groups`,
from the original weight before any update. `act_order` quantizes the columns in order of
decreasing diag(H); with static groups each column still uses its own original group's
parameters. Any weight format of the core works: its `choose_qparams` / `apply` run per group
and per column.

Inside a decoder block the Linears are quantized in true-sequential order (q/k/v, then o, then
gate/up, then down): the inputs of a later group are recorded after the earlier ones are
quantized. Each group's pass over the calibration batches stops a batch's forward as soon as every
Linear of the group has seen its input (the rest of the block cannot change it), and Linears fed
the very same input tensor (q/k/v, gate/up) share one Hessian accumulation. The next block sees
the quantized block's outputs, or the full-precision block's (`next_inputs`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from wkvaq_quant.arch import arch_of
from wkvaq_quant.config import QuantArgs
from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.formats import QParams, get_format
from wkvaq_quant.modeling.attach import block_linears
from wkvaq_quant.weights.registry import AlgoSpec, register_weight_algo, without_weights
from wkvaq_quant.weights.blocks import NEXT_INPUTS, BlockInputs, PausedForwards, capture_block_inputs, for_each_block

__all__ = ["GptqBlockResult", "GptqConfig", "GptqResult", "HessianAccumulator", "gptq_block",
           "gptq_quantize", "gptq_weight", "group_hessians"]



@dataclass(frozen=True)
class GptqConfig:
    """percdamp: dampening, a fraction of the mean of diag(H) added to the diagonal.
    blocksize: columns per lazy batch update. act_order: columns in order of decreasing diag(H).
    static_groups: group parameters from the original weight (before any update).
    next_inputs: what the next block sees ("quantized" or "fp", see blocks.NEXT_INPUTS).
    single_pass: one forward of each block over the calibration batches, every batch paused at
    each group's input while the group is quantized (blocks.PausedForwards), instead of one
    forward per group from the block's inputs; the same weights in about half the forward work,
    but every batch's activations inside the block stay in memory meanwhile."""

    percdamp: float = 0.01
    blocksize: int = 128
    act_order: bool = False
    static_groups: bool = False
    next_inputs: str = "quantized"
    single_pass: bool = False

    EXECUTION_ONLY = ("single_pass",)
    """Fields that change how the work is done, not its result (bit-identical either way)."""

    def __post_init__(self) -> None:
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) \
                or not 0 <= self.percdamp <= 1:
            raise ValueError(f"--percdamp {self.percdamp!r}: allowed: a number in [0, 1]")
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize <= 0:
            raise ValueError(f"GPTQ blocksize {self.blocksize!r}: allowed: a positive integer")
        for flag, v in (("--act_order", self.act_order), ("--static_groups", self.static_groups),
                        ("--gptq_single_pass", self.single_pass)):
            if not isinstance(v, bool):
                raise ValueError(f"{flag} {v!r}: allowed: True, False")
        if self.next_inputs not in NEXT_INPUTS:
            raise ValueError(f"--gptq_next_inputs {self.next_inputs!r}: allowed: {', '.join(NEXT_INPUTS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def result_dict(self) -> dict[str, Any]:
        """The settings that decide the weights (to_dict without EXECUTION_ONLY)."""
        return {k: v for k, v in asdict(self).items() if k not in self.EXECUTION_ONLY}


@dataclass
class GptqResult:
    """weight: the fake-quantized weight [out, in] (the input's dtype). loss: sum over columns of
    (w - q)^2 / Hinv[i, i]^2 / 2. qparams: the parameters of every group in the order they were
    used (static groups: in column order; one entry for per-channel / per-tensor)."""

    weight: Tensor
    loss: float
    qparams: list[QParams] = field(default_factory=list)


class _Quantizer:
    """The core format of `args`, applied with parameters chosen from a slice of columns."""

    def __init__(self, args: QuantArgs) -> None:
        if args.double_quant:
            raise ValueError("GPTQ with double_quant (--use_double_quant): the UINT8 scale code of a row depends "
                             "on every group's scale, which GPTQ chooses one group at a time; allowed: "
                             "double_quant=False")
        self.args, self.fmt = args, get_format(args.dtype)
        self.per_tensor = args.granularity == "per_tensor"

    def params(self, cols_t: Tensor) -> QParams:
        """Parameters of one group per weight row from its columns, given transposed: [n, rows]."""
        # -> one group per row [rows, 1, n] (per tensor: [1, 1, rows * n])
        g = cols_t.reshape(1, 1, -1) if self.per_tensor else cols_t.T.unsqueeze(1)
        return self.fmt.choose_qparams(g.contiguous(), self.args)

    def bind(self, qp: QParams) -> Callable[[Tensor, Tensor], None]:
        """f(w, out): quantize one weight column w [rows] into out [rows] with `qp`."""
        apply = self.fmt.bind(qp, self.args)
        return lambda w, out: apply(w.view(-1, 1, 1), out.view(-1, 1, 1))


def _hinv_(H: Tensor, percdamp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, computed in H's own memory (H is overwritten and
    returned): no [in, in] temporaries, which at in = 8192-14336 are 0.25-0.8 GiB each."""
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    try:
        torch.linalg.cholesky(H, out=H)
        torch.cholesky_inverse(H, out=H)
        return torch.linalg.cholesky(H, upper=True, out=H)
    except torch.linalg.LinAlgError:
        raise ValueError(f"GPTQ: the Hessian is not positive definite with --percdamp {percdamp}; "
                         f"allowed: a larger --percdamp (e.g. 0.1), or more calibration data") from None


@torch.no_grad()
def gptq_weight(weight: Tensor, H: Tensor, args: QuantArgs, cfg: GptqConfig = GptqConfig(),
                overwrite_H: bool = False) -> GptqResult:
    """GPTQ of one weight [out, in] with the Hessian H [in, in] of its inputs (see module doc).
    With `overwrite_H` (a float32 H on the weight's device that nothing else needs) H's memory is
    used for the work instead of a copy."""
    if not args.enabled:
        return GptqResult(weight=weight, loss=0.0)
    rows, cols = weight.shape
    if H.shape != (cols, cols):
        raise ValueError(f"GPTQ: Hessian shape {tuple(H.shape)} does not match the weight's {cols} input columns")
    quant = _Quantizer(args)
    gs = args.group_size if args.granularity == "per_group" else -1
    # transposed work copies: column i of the weight is row i of WT, contiguous
    WT = weight.detach().to(torch.float32).T.contiguous()
    H = H.detach().to(device=WT.device, dtype=torch.float32, copy=not overwrite_H)
    qparams: list[QParams] = [] if gs != -1 else [quant.params(WT)]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    WT[dead] = 0
    static: list[QParams] = []
    if gs != -1 and cfg.static_groups:
        static = [quant.params(WT[s: s + gs]) for s in range(0, cols, gs)]
        qparams = static
    perm = torch.arange(cols, device=WT.device)
    if cfg.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        WT, H = WT[perm], H[perm]
        H = H[:, perm]  # two steps: never three [in, in] copies at once
    Hinv = _hinv_(H, cfg.percdamp)  # H (our copy) becomes Hinv
    QT = torch.empty_like(WT)
    loss = torch.zeros((), dtype=torch.float64, device=WT.device)
    static_columns = [quant.bind(p) for p in static]
    column = quant.bind(qparams[0]) if gs == -1 else None
    i1 = 0
    while i1 < cols:
        i2 = min(i1 + cfg.blocksize, cols)
        if gs != -1 and not cfg.static_groups:
            last_start = (i2 - 1) // gs * gs  # a group starting inside this block must end inside it
            if i1 < last_start < cols and last_start + gs > i2 and i2 < cols:
                i2 = last_start
        W1 = WT[i1:i2]  # a view: these columns are final once the block is done
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if gs != -1:
                if cfg.static_groups:
                    column = static_columns[int(perm[col]) // gs]
                elif col % gs == 0:
                    # the group's current columns: in W1 when inside the block, else WT (up to date at i1)
                    cur = W1[i: i + gs] if col + gs <= i2 or i2 == cols else WT[col: col + gs]
                    qp = quant.params(cur)
                    qparams.append(qp)
                    column = quant.bind(qp)
            w, q, err = W1[i], QT[col], Err1[i]
            column(w, q)
            torch.sub(w, q, out=err).div_(Hinv1[i, i])
            W1[i + 1:].addr_(Hinv1[i, i + 1:], err, alpha=-1)
        loss += Err1.double().square().sum() / 2
        WT[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)
        i1 = i2
    del WT, W1, Err1, Hinv, Hinv1  # free the work copies before the result's copy
    if cfg.act_order:
        QT = QT[torch.argsort(perm)]
    return GptqResult(weight=QT.T.to(weight.dtype).contiguous(), loss=float(loss), qparams=qparams)


class _GroupDone(Exception):
    """Raised by the last pre-hook of a group to end the block's forward early."""


class HessianAccumulator:
    """H = 2/n * sum of x^T x over the n input rows a Linear sees (a forward pre-hook).

    H is symmetric, so only its lower triangle is accumulated, in row blocks of TRI_BLOCK
    (about 0.6x the work of the full product); the upper triangle is mirrored from it once, when H
    is read."""

    TRI_BLOCK = 64

    def __init__(self, in_features: int, device: torch.device | str) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0
        self._scaled = False

    def add(self, x: Tensor) -> None:
        if self._scaled:
            raise RuntimeError("HessianAccumulator: inputs added after H was read")
        x = x.reshape(-1, x.shape[-1]).to(device=self.sum.device, dtype=torch.float32)  # [..., in] -> [n, in]
        for s, e in self._row_blocks():
            self.sum[s:e, :e].addmm_(x[:, s:e].T, x[:, :e])
        self.n += x.shape[0]

    def _row_blocks(self) -> Iterator[tuple[int, int]]:
        """(start, end) of H's blocks of TRI_BLOCK rows."""
        c = self.sum.shape[0]
        return ((s, min(s + self.TRI_BLOCK, c)) for s in range(0, c, self.TRI_BLOCK))

    def hook(self, _mod: nn.Module, inputs: tuple) -> None:
        self.add(inputs[0])

    @property
    def H(self) -> Tensor:
        """The Hessian, completed and scaled in place the first time (the sum is not kept: no
        second copy)."""
        if self.n == 0:
            raise RuntimeError("GPTQ: the Linear saw no inputs during calibration")
        if not self._scaled:
            for s, e in self._row_blocks():  # upper triangle := lower triangle, one block of rows at a time
                self.sum[s:e, e:].copy_(self.sum[e:, s:e].T)
            self.sum.mul_(2.0 / self.n)
            self._scaled = True
        return self.sum


@torch.no_grad()
def group_hessians(block: nn.Module, modules: list[nn.Module], inputs: BlockInputs,
                   device: torch.device | str) -> list[Tensor]:
    """The Hessian of each of `modules` (Linears of `block`) over every batch of `inputs`: one pass
    in which each batch's forward ends once all of them have seen their input, and modules given
    the very same input tensor (q/k/v after the norm) share one accumulation. Equal to hooking
    each module through a full forward of the block."""
    owner: dict[int, int] = {}  # module index -> index of the module whose accumulator it shares
    accs: dict[int, HessianAccumulator] = {}
    seen: list[tuple[int, Tensor]] = []  # this batch: (module index, its input)

    def hook(i: int):
        def pre_hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0]
            first = next((j for j, t in seen if t is x), i)
            if owner.setdefault(i, first) != first:
                raise RuntimeError("GPTQ: the Linears of a group shared inputs differently across batches")
            if first == i:
                accs.setdefault(i, HessianAccumulator(modules[i].in_features, device)).add(x)
            seen.append((i, x))
            if len(seen) == len(modules):
                raise _GroupDone
        return pre_hook

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        for h, kw in inputs.batches(device):
            seen.clear()
            try:
                block(h, **kw)
            except _GroupDone:
                pass
    finally:
        for handle in handles:
            handle.remove()
    seen.clear()
    if len(owner) < len(modules):
        raise RuntimeError("GPTQ: the Linear saw no inputs during calibration")
    return [accs[owner[i]].H for i in range(len(modules))]


def _sequential_groups(block: nn.Module, linears: list[tuple[str, nn.Linear]]) -> list[list[tuple[str, nn.Linear]]]:
    """The block's Linears in its family's true-sequential order (wkvaq_quant.arch); Linears the
    order does not name come last."""
    sequential = arch_of(block).sequential
    named = {n for g in sequential for n in g}
    groups = [[(s, m) for s, m in linears if s in g] for g in sequential]
    groups.append([(s, m) for s, m in linears if s not in named])
    return [g for g in groups if g]


@dataclass
class GptqBlockResult:
    """losses: per quantized Linear (short name) its GPTQ loss. outputs: with single_pass, the
    quantized block's outputs on its inputs (computed on the way; None otherwise)."""

    losses: dict[str, float]
    outputs: BlockInputs | None = None


def _enabled_groups(block: nn.Module, block_index: int, linears: list[tuple[str, nn.Linear]], plan: QuantPlan) \
        -> list[list[tuple[str, nn.Linear, QuantArgs]]]:
    """The true-sequential groups of (short name, Linear, weight args), quantized Linears only."""
    groups = []
    for group in _sequential_groups(block, linears):
        todo = [(s, m, plan.linear_args(block_index, s)[0]) for s, m in group]
        todo = [(s, m, a) for s, m, a in todo if a.enabled]
        if todo:
            groups.append(todo)
    return groups


def _quantize_group(todo: list[tuple[str, nn.Linear, QuantArgs]], hessians: list[Tensor], cfg: GptqConfig,
                    losses: dict[str, float]) -> None:
    """GPTQ each Linear of a group with its Hessian, in place (a shared H is worked in by its last user)."""
    for j, ((short, m, args), H) in enumerate(zip(todo, hessians)):
        last_user = not any(h is H for h in hessians[j + 1:])  # q/k/v share one H
        hessians[j] = None
        res = gptq_weight(m.weight, H, args, cfg, overwrite_H=last_user)
        del H
        m.weight.copy_(res.weight)
        losses[short] = res.loss


@torch.no_grad()
def gptq_block(block: nn.Module, index: int, linears: list[tuple[str, nn.Linear]], inputs: BlockInputs,
               plan: QuantPlan, cfg: GptqConfig, device: torch.device | str) -> GptqBlockResult:
    """GPTQ every enabled Linear (short name, module) of decoder block `index` (on `device`) in
    true-sequential order, in place; returns the loss of each quantized Linear by short name
    (and, with cfg.single_pass, the quantized block's outputs)."""
    groups = _enabled_groups(block, index, linears, plan)
    if cfg.single_pass:
        return _gptq_block_single_pass(block, index, groups, inputs, cfg, device)
    losses: dict[str, float] = {}
    for todo in groups:
        _quantize_group(todo, group_hessians(block, [m for _, m, _ in todo], inputs, device), cfg, losses)
    return GptqBlockResult(losses)


_PASSED = object()  # a group's Linears were all called: another call is not part of the single pass


def _gptq_block_single_pass(block: nn.Module, index: int, groups: list[list[tuple[str, nn.Linear, QuantArgs]]],
                            inputs: BlockInputs, cfg: GptqConfig, device: torch.device | str) -> GptqBlockResult:
    """gptq_block with one paused forward per batch: every batch runs to the input of the group's
    first Linear, the group's Hessian is accumulated from those inputs in batch order (as
    group_hessians does), the group is quantized, and the batches go on to the next group. The
    other Linears of a group must then be called on the very same input tensor (q/k/v, gate/up),
    which a pre-hook checks, so the weights equal gptq_block's per-group passes bit for bit."""
    losses: dict[str, float] = {}
    expected: dict[int, Any] = {}  # id(Linear) -> per batch the input it must get (None: not yet known)
    names = {id(m): s for todo in groups for s, m, _ in todo}
    handles = []
    with PausedForwards(block, inputs, device) as runner:

        def check(mod: nn.Module, args: tuple) -> None:
            b = runner.batch
            want = expected[id(mod)]
            if b is not None and (want is None or want is _PASSED or args[0] is not want[b]):
                raise RuntimeError(f"--gptq_single_pass: {names[id(mod)]} of block {index} is not called right after "
                                   f"the first Linear of its true-sequential group, on the same input tensor; "
                                   f"run without --gptq_single_pass")

        try:
            previous: list[nn.Module] = []
            for todo in groups:
                first, others = todo[0][1], [m for _, m, _ in todo[1:]]
                for m in others:
                    expected[id(m)] = None
                    handles.append(m.register_forward_pre_hook(check))
                xs = runner.run_to(first)
                for m in previous:
                    expected[id(m)] = _PASSED
                for m in others:
                    expected[id(m)] = xs
                acc = HessianAccumulator(first.in_features, device)
                for x in xs:
                    acc.add(x)
                del xs
                _quantize_group(todo, [acc.H] * len(todo), cfg, losses)
                del acc
                previous = others
            outs = runner.finish()  # also checks the last group's other Linears
        finally:
            for h in handles:
                h.remove()
    return GptqBlockResult(losses, inputs.with_hidden(outs) if cfg.next_inputs == "quantized" else None)


def gptq_quantize(model: nn.Module, plan: QuantPlan, calib_ids: Tensor, cfg: GptqConfig = GptqConfig(),
                  device: torch.device | str = "cpu", batch_size: int = 1, progress: bool = True) -> dict[str, float]:
    """GPTQ every enabled decoder Linear of `model` on `calib_ids` [n, T], block by block, in place
    (settings per Linear from `plan.linear_args`; disabled Linears are left untouched).
    Returns the loss of every quantized Linear by full module name."""
    by_block: dict[int, list[tuple[str, str, nn.Linear]]] = {}
    for b, short, name, lin in block_linears(model):
        by_block.setdefault(b, []).append((short, name, lin))
    losses: dict[str, float] = {}

    def process(i: int, block: nn.Module, block_inputs: BlockInputs) -> BlockInputs | None:
        entries = by_block.get(i, [])
        names = {short: name for short, name, _ in entries}
        found = gptq_block(block, i, [(s, m) for s, _, m in entries], block_inputs, plan, cfg, device)
        losses.update({names[s]: v for s, v in found.losses.items()})
        return found.outputs

    inputs = capture_block_inputs(model, calib_ids, device, batch_size)
    for_each_block(model, inputs, process, device, next_inputs=cfg.next_inputs, progress=progress,
                   desc="GPTQ blocks")
    return losses


def _run(model: nn.Module, plan: QuantPlan, algo: Any, calib: Tensor, device: str, progress: bool) -> QuantPlan:
    gptq_quantize(model, plan, calib, algo.gptq, device, batch_size=1, progress=progress)
    return without_weights(plan)


def _layer_wise_block(model: nn.Module, index: int, block: nn.Module, prefix: str, inputs: BlockInputs,
                      plan: QuantPlan, algo: Any, device: torch.device | str) -> BlockInputs | None:
    linears = [(short, lin) for short, _, lin in arch_of(block).block_linears(block)]
    return gptq_block(block, index, linears, inputs, plan, algo.gptq, device).outputs


def _slug(algo: Any) -> str:
    g, c = algo.gptq, algo.calib
    parts = ["gptq"]
    if g.act_order:
        parts.append("ao")
    if g.static_groups:
        parts.append("sg")
    if g.next_inputs == "fp":
        parts.append("fpin")
    if g.percdamp != GptqConfig.percdamp:
        parts.append(f"d{g.percdamp:g}")
    parts.append(f"n{c.n_samples}x{c.seq_len}")
    return "-".join(parts)


def _check_offload(algo: Any) -> None:
    if algo.gptq.single_pass:
        raise ValueError("--offload_activations with --gptq_single_pass: the single pass keeps every batch's "
                         "activations in memory; allowed: one of the two")


register_weight_algo(AlgoSpec(name="gptq", method="Gptq", needs_calib=True, run=_run, block=_layer_wise_block,
                              settings="gptq", next_inputs=lambda algo: algo.gptq.next_inputs, slug=_slug,
                              check_offload=_check_offload))
