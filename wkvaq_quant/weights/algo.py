"""The weight algorithm `main.py` runs before evaluation (`--weight_algo`), looked up by name.

rtn:  nothing to do here; `attach` rounds every weight to nearest (the plain path).
gptq: GPTQ on calibration windows, in place; `attach` then applies only the rest of the plan
      (activations, KV cache), since the weights are already quantized.
awq:  AWQ's scale and clip search on calibration windows (the `awq` package), folded into the
      model in place; `attach` then rounds the scaled, clipped weights to nearest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from wkvaq_quant.config import FULL_PRECISION_BITS, LINEAR_NAMES, QuantArgs, QuantPlan
from wkvaq_quant.data import CALIB_DATASETS
from wkvaq_quant.weights.gptq import GptqConfig, gptq_quantize

__all__ = ["AWQ_SEARCH_DTYPES", "WEIGHT_ALGOS", "AwqSearchConfig", "CalibConfig", "WeightAlgo", "check_search_dtype",
           "quantizes_weights", "run_weight_algo", "without_weights"]


@dataclass(frozen=True)
class CalibConfig:
    """Calibration windows: `n_samples` windows of `seq_len` tokens from the calibration split of
    `dataset`, sampled with `seed` (flags --calib_dataset, --n_calib, --calib_seq_len, --seed)."""

    dataset: str = "wiki_sample"
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset not in CALIB_DATASETS:
            raise ValueError(f"--calib_dataset {self.dataset!r}: allowed: {', '.join(CALIB_DATASETS)}")
        for flag, v in (("--n_calib", self.n_samples), ("--calib_seq_len", self.seq_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{flag} {v!r}: allowed: a positive integer")


AWQ_SEARCH_DTYPES: dict[str, torch.dtype | None] = {"model": None, "bfloat16": torch.bfloat16,
                                                    "float16": torch.float16}
"""--search_dtype: "model" runs AWQ's scale search in the model's dtype; a lower dtype computes, for
each Linear, only the change of its output in that dtype, on top of its recorded output (faster on
hardware with fast bfloat16 / float16 products; see awq.auto_scale)."""


def check_search_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a --search_dtype name (None: the model's)."""
    if name not in AWQ_SEARCH_DTYPES:
        raise ValueError(f"--search_dtype {name!r}: allowed: {', '.join(AWQ_SEARCH_DTYPES)}")
    return AWQ_SEARCH_DTYPES[name]


@dataclass(frozen=True)
class AwqSearchConfig:
    """AWQ's search: `n_grid` grid points for the scale and the clip searches (--n_grid);
    `max_shrink` and `n_sample_token`: the clip search's range and token sample (llm-awq's values);
    `search_dtype`: the scale search's products in the model's dtype ("model") or, for their change
    only, in a lower one (--search_dtype, see AWQ_SEARCH_DTYPES)."""

    n_grid: int = 20
    max_shrink: float = 0.5
    n_sample_token: int = 512
    search_dtype: str = "model"

    def __post_init__(self) -> None:
        check_search_dtype(self.search_dtype)
        if isinstance(self.n_grid, bool) or not isinstance(self.n_grid, int) or self.n_grid <= 0:
            raise ValueError(f"--n_grid {self.n_grid!r}: allowed: a positive integer")
        if not 0 <= self.max_shrink < 1 or self.n_sample_token <= 0:
            raise ValueError(f"AWQ clip search: max_shrink {self.max_shrink} (allowed: [0, 1)), n_sample_token "
                             f"{self.n_sample_token} (allowed: > 0)")


def _run_rtn(model: nn.Module, plan: QuantPlan, algo: WeightAlgo, calib: Tensor | None, device: str,
             progress: bool) -> QuantPlan:
    return plan


def _run_gptq(model: nn.Module, plan: QuantPlan, algo: WeightAlgo, calib: Tensor | None, device: str,
              progress: bool) -> QuantPlan:
    gptq_quantize(model, plan, calib, algo.gptq, device, batch_size=1, progress=progress)
    return without_weights(plan)


def _run_awq(model: nn.Module, plan: QuantPlan, algo: WeightAlgo, calib: Tensor | None, device: str,
             progress: bool) -> QuantPlan:
    from awq.pre_quant import run_awq

    a = algo.awq
    run_awq(model, plan, calib, "", device, n_grid=a.n_grid, max_shrink=a.max_shrink, n_sample_token=a.n_sample_token,
            progress=progress, record_grids=False, search_dtype=a.search_dtype)
    return plan


_RUNNERS: dict[str, Callable[..., QuantPlan]] = {"rtn": _run_rtn, "gptq": _run_gptq, "awq": _run_awq}
WEIGHT_ALGOS = tuple(_RUNNERS)
_NEEDS_CALIB = {"rtn": False, "gptq": True, "awq": True}
_NEXT_INPUTS = {"awq": "fp"}  # AWQ: every block searches on the full-precision model's inputs, as llm-awq


@dataclass(frozen=True)
class WeightAlgo:
    """name: one of WEIGHT_ALGOS. gptq / awq: their settings. calib: the calibration data (unused by rtn)."""

    name: str = "rtn"
    gptq: GptqConfig = field(default_factory=GptqConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    awq: AwqSearchConfig = field(default_factory=AwqSearchConfig)

    def __post_init__(self) -> None:
        if self.name not in WEIGHT_ALGOS:
            raise ValueError(f"--weight_algo {self.name!r}: allowed: {', '.join(WEIGHT_ALGOS)}")
        if not isinstance(self.gptq, GptqConfig) or not isinstance(self.calib, CalibConfig) \
                or not isinstance(self.awq, AwqSearchConfig):
            raise ValueError("WeightAlgo.gptq must be a GptqConfig, WeightAlgo.calib a CalibConfig and WeightAlgo.awq "
                             "an AwqSearchConfig")

    @property
    def needs_calib(self) -> bool:
        return _NEEDS_CALIB[self.name]

    @property
    def next_inputs(self) -> str:
        """What the block after a calibrated one sees (blocks.NEXT_INPUTS)."""
        return self.gptq.next_inputs if self.name == "gptq" else _NEXT_INPUTS.get(self.name, "quantized")

    def check_offload_activations(self) -> None:
        """Refuse --offload_activations where the algorithm keeps the activations in memory anyway."""
        if self.name == "gptq" and self.gptq.single_pass:
            raise ValueError("--offload_activations with --gptq_single_pass: the single pass keeps every batch's "
                             "activations in memory; allowed: one of the two")

    def to_dict(self, result_only: bool = False) -> dict[str, Any]:
        """Every setting; with `result_only` those that decide the weights (no execution-only
        fields such as GPTQ's single_pass): what result names and layer-wise resumption key on."""
        if self.name == "rtn":
            return {"name": "rtn"}
        if self.name == "awq":
            return {"name": "awq", "awq": dataclasses.asdict(self.awq), "calib": dataclasses.asdict(self.calib)}
        gptq = self.gptq.result_dict() if result_only else self.gptq.to_dict()
        return {"name": self.name, "gptq": gptq, "calib": dataclasses.asdict(self.calib)}

    def slug(self) -> str:
        """e.g. `gptq-ao-sg-fpin-n32x512`, `awq-g20-n128x512` (RTN: empty, so earlier result names stay)."""
        if self.name == "rtn":
            return ""
        g, c = self.gptq, self.calib
        if self.name == "awq":
            return f"awq-g{self.awq.n_grid}-n{c.n_samples}x{c.seq_len}"
        parts = [self.name]
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


def quantizes_weights(plan: QuantPlan) -> bool:
    """True when some decoder Linear's weight is quantized (globally or by a per-layer setting)."""
    if plan.layers is None:
        return plan.w.enabled
    return any(plan.linear_args(b, n)[0].enabled for b in plan.layers.blocks_named() for n in LINEAR_NAMES)


def without_weights(plan: QuantPlan) -> QuantPlan:
    """`plan` with every weight setting off (activation and KV settings kept)."""
    w_off = QuantArgs(bits=FULL_PRECISION_BITS, target="weight")
    layers = plan.layers
    if layers is not None:
        settings = tuple(dataclasses.replace(s, w=w_off) if s.w is not None else s for s in layers.settings)
        layers = dataclasses.replace(layers, settings=settings)
    return dataclasses.replace(plan, w=w_off, layers=layers)


@torch.no_grad()
def run_weight_algo(model: nn.Module, plan: QuantPlan, algo: WeightAlgo, calib: Tensor | None, device: str = "cpu",
                    progress: bool = True) -> QuantPlan:
    """Run `algo` on `model` in place; returns the plan `attach` still has to apply."""
    if algo.needs_calib and calib is None:
        raise ValueError(f"--weight_algo {algo.name} needs calibration windows")
    return _RUNNERS[algo.name](model, plan, algo, calib, device, progress)
