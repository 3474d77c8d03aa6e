"""The weight algorithm `main.py` runs before evaluation (`--weight_algo`), looked up by name in
the registry (weights.registry) where each algorithm's module registers itself:

rtn:  nothing to do here; `attach` rounds every weight to nearest (the plain path).
gptq: GPTQ on calibration windows, in place; `attach` then applies only the rest of the plan
      (activations, KV cache), since the weights are already quantized.
awq:  AWQ's scale and clip search on calibration windows (weights.awq), folded into the model in
      place; `attach` then rounds the scaled, clipped weights to nearest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from wkvaq_quant.data import CALIB_DATASETS
from wkvaq_quant.plan import QuantPlan
# the built-in algorithms register themselves on import
from wkvaq_quant.weights import rtn as _rtn  # noqa: F401
from wkvaq_quant.weights import gptq as _gptq  # noqa: F401
from wkvaq_quant.weights import awq as _awq  # noqa: F401
from wkvaq_quant.weights.awq.settings import AwqSearchConfig
from wkvaq_quant.weights.gptq import GptqConfig
from wkvaq_quant.weights.registry import AlgoSpec, get_weight_algo, quantizes_linears, weight_algo_names, without_weights

__all__ = ["WEIGHT_ALGOS", "CalibConfig", "WeightAlgo", "quantizes_weights", "run_weight_algo", "without_weights"]

WEIGHT_ALGOS = weight_algo_names()


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


@dataclass(frozen=True)
class WeightAlgo:
    """name: a registered algorithm (WEIGHT_ALGOS). gptq / awq: their settings. calib: the
    calibration data (unused by rtn)."""

    name: str = "rtn"
    gptq: GptqConfig = field(default_factory=GptqConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    awq: AwqSearchConfig = field(default_factory=AwqSearchConfig)

    def __post_init__(self) -> None:
        get_weight_algo(self.name)
        if not isinstance(self.gptq, GptqConfig) or not isinstance(self.calib, CalibConfig) \
                or not isinstance(self.awq, AwqSearchConfig):
            raise ValueError("WeightAlgo.gptq must be a GptqConfig, WeightAlgo.calib a CalibConfig and WeightAlgo.awq "
                             "an AwqSearchConfig")

    @property
    def spec(self) -> AlgoSpec:
        return get_weight_algo(self.name)

    @property
    def settings(self) -> Any:
        """The algorithm's own settings (None for RTN)."""
        return getattr(self, self.spec.settings) if self.spec.settings else None

    @property
    def needs_calib(self) -> bool:
        return self.spec.needs_calib

    @property
    def next_inputs(self) -> str:
        """What the block after a calibrated one sees (blocks.NEXT_INPUTS)."""
        return self.spec.next_inputs(self)

    def check_plan(self, plan: QuantPlan) -> None:
        """Refuse algorithm settings that do not go with `plan` (the algorithm's own check)."""
        if self.spec.check_plan is not None:
            self.spec.check_plan(self, plan)

    def check_offload_activations(self) -> None:
        """Refuse --offload_activations where the algorithm keeps the activations in memory anyway."""
        if self.spec.check_offload is not None:
            self.spec.check_offload(self)

    def to_dict(self, result_only: bool = False) -> dict[str, Any]:
        """Every setting; with `result_only` those that decide the weights (no execution-only
        fields such as GPTQ's single_pass): what result names and layer-wise resumption key on."""
        settings = self.settings
        if settings is None:
            return {"name": self.name}
        as_dict = settings.result_dict() if result_only and hasattr(settings, "result_dict") \
            else dataclasses.asdict(settings)
        return {"name": self.name, self.spec.settings: as_dict, "calib": dataclasses.asdict(self.calib)}

    def slug(self) -> str:
        """e.g. `gptq-ao-sg-fpin-n32x512`, `awq-g20-n128x512` (RTN: empty, so earlier result names stay)."""
        return self.spec.slug(self)


def quantizes_weights(plan: QuantPlan) -> bool:
    """True when some decoder Linear's weight is quantized (globally or by a per-layer setting)."""
    return quantizes_linears(plan, 0)


@torch.no_grad()
def run_weight_algo(model: nn.Module, plan: QuantPlan, algo: WeightAlgo, calib: Tensor | None, device: str = "cpu",
                    progress: bool = True) -> QuantPlan:
    """Run `algo` on `model` in place; returns the plan `attach` still has to apply."""
    if algo.needs_calib and calib is None:
        raise ValueError(f"--weight_algo {algo.name} needs calibration windows")
    return algo.spec.run(model, plan, algo, calib, device, progress)
