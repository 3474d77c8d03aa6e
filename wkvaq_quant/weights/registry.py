"""The weight-algorithm registry: each algorithm module (rtn, gptq, awq) registers one `AlgoSpec`;
`--weight_algo`, llmc's `quant.method`, `main.py`, layer-wise quantization and the result names
look it up here, so adding an algorithm is one module that calls `register_weight_algo`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from torch import Tensor, nn

from wkvaq_quant.config import FULL_PRECISION_BITS, LINEAR_NAMES, QuantArgs

from wkvaq_quant.plan import QuantPlan

if TYPE_CHECKING:
    from wkvaq_quant.weights.algo import WeightAlgo
    from wkvaq_quant.weights.blocks import BlockInputs

__all__ = ["AlgoSpec", "get_weight_algo", "method_to_algo", "quantizes_linears", "register_weight_algo", "weight_algo_names",
           "without_inputs", "without_weights"]


def _no_slug(algo: WeightAlgo) -> str:
    return ""


def _quantized_next(algo: WeightAlgo) -> str:
    return "quantized"


@dataclass(frozen=True)
class AlgoSpec:
    """One weight algorithm.

    name: its --weight_algo value; method: the llmc `quant.method` that selects it.
    run(model, plan, algo, calib, device, progress) -> the plan `attach` still applies (in memory).
    block(model, index, block, prefix, inputs, plan, algo, device) -> the next block's inputs, or
      None to run the processed block for them (layer-wise, calibrated algorithms only).
    settings: the WeightAlgo field holding its settings, if any. next_inputs(algo): what the next
    block sees (blocks.NEXT_INPUTS). fp_outputs_from_process: `block` returns the full-precision
    outputs it recorded. slug(algo) / to_dict(algo, result_only): its part of the result name and
    record. check_offload(algo): refuse --offload_activations where it cannot apply. check_plan(algo,
    plan): refuse settings that do not go with the plan (before anything loads). uses_input_settings(algo):
    its search reads the plan's activation settings (so a layer-wise run may carry them).
    """

    name: str
    method: str
    needs_calib: bool
    run: Callable[..., QuantPlan]
    block: Callable[..., BlockInputs | None] | None = None
    settings: str | None = None
    next_inputs: Callable[[WeightAlgo], str] = _quantized_next
    fp_outputs_from_process: bool = False
    slug: Callable[[WeightAlgo], str] = _no_slug
    to_dict: Callable[[WeightAlgo, bool], dict[str, Any]] | None = None
    check_offload: Callable[[WeightAlgo], None] | None = None
    check_plan: Callable[[WeightAlgo, QuantPlan], None] | None = None
    uses_input_settings: Callable[[WeightAlgo], bool] = lambda algo: False

    def __post_init__(self) -> None:
        if self.needs_calib and self.block is None:
            raise ValueError(f"weight algorithm {self.name!r} needs calibration but has no layer-wise block step")


_ALGOS: dict[str, AlgoSpec] = {}


def register_weight_algo(spec: AlgoSpec) -> AlgoSpec:
    """Add an algorithm; a second, different spec under a taken name or method is refused."""
    for other in _ALGOS.values():
        if other.name != spec.name and other.method == spec.method:
            raise ValueError(f"quant.method {spec.method!r} already selects --weight_algo {other.name}")
    old = _ALGOS.get(spec.name)
    if old is not None and old != spec:
        raise ValueError(f"weight algorithm {spec.name!r} is already registered")
    _ALGOS[spec.name] = spec
    return spec


def weight_algo_names() -> tuple[str, ...]:
    """The registered names, those without calibration first, then by name (whatever the import order)."""
    return tuple(sorted(_ALGOS, key=lambda n: (_ALGOS[n].needs_calib, n)))


def get_weight_algo(name: str) -> AlgoSpec:
    if name not in _ALGOS:
        raise ValueError(f"--weight_algo {name!r}: allowed: {', '.join(_ALGOS)}")
    return _ALGOS[name]


def method_to_algo(method: str) -> str:
    """The --weight_algo that an llmc `quant.method` selects."""
    for spec in _ALGOS.values():
        if spec.method == method:
            return spec.name
    raise ValueError(f"quant.method {method!r}: allowed: {', '.join(s.method for s in _ALGOS.values())}")


def quantizes_linears(plan: QuantPlan, part: int) -> bool:
    """True when some decoder Linear's weight (`part` 0) or input (`part` 1) is quantized, globally or
    by a per-layer setting."""
    if plan.layers is None:
        return (plan.w, plan.a)[part].enabled
    return any(plan.linear_args(b, n)[part].enabled for b in plan.layers.blocks_named() for n in LINEAR_NAMES)


def without_weights(plan: QuantPlan) -> QuantPlan:
    """`plan` with every weight setting off (activation and KV settings kept): what `attach` still
    applies after an algorithm that quantized the weights itself."""
    w_off = QuantArgs(bits=FULL_PRECISION_BITS, target="weight")
    layers = plan.layers
    if layers is not None:
        settings = tuple(dataclasses.replace(s, w=w_off) if s.w is not None else s for s in layers.settings)
        layers = dataclasses.replace(layers, settings=settings)
    return dataclasses.replace(plan, w=w_off, layers=layers)


def without_inputs(plan: QuantPlan) -> QuantPlan:
    """`plan` with every input-activation setting off (weight and KV settings kept)."""
    a_off = QuantArgs(bits=FULL_PRECISION_BITS, dtype=plan.a.dtype, target="activation")
    layers = plan.layers
    if layers is not None:
        settings = tuple(dataclasses.replace(s, a=None) if s.a is not None else s for s in layers.settings)
        layers = dataclasses.replace(layers, settings=settings)
    return dataclasses.replace(plan, a=a_off, layers=layers)


def run_nothing(model: nn.Module, plan: QuantPlan, algo: WeightAlgo, calib: Tensor | None, device: str,
                progress: bool) -> QuantPlan:
    """The in-memory step of an algorithm that leaves the rounding to `attach` (RTN)."""
    return plan
