"""The weight algorithm `main.py` runs before evaluation (`--weight_algo`), looked up by name.

rtn:  nothing to do here; `attach` rounds every weight to nearest (the plain path).
gptq: GPTQ on calibration windows, in place; `attach` then applies only the rest of the plan
      (activations, KV cache), since the weights are already quantized.
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

__all__ = ["WEIGHT_ALGOS", "CalibConfig", "WeightAlgo", "quantizes_weights", "run_weight_algo", "without_weights"]


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


def _run_rtn(model: nn.Module, plan: QuantPlan, algo: WeightAlgo, calib: Tensor | None, device: str,
             progress: bool) -> QuantPlan:
    return plan


def _run_gptq(model: nn.Module, plan: QuantPlan, algo: WeightAlgo, calib: Tensor | None, device: str,
              progress: bool) -> QuantPlan:
    gptq_quantize(model, plan, calib, algo.gptq, device, batch_size=1, progress=progress)
    return without_weights(plan)


_RUNNERS: dict[str, Callable[..., QuantPlan]] = {"rtn": _run_rtn, "gptq": _run_gptq}
WEIGHT_ALGOS = tuple(_RUNNERS)
_NEEDS_CALIB = {"rtn": False, "gptq": True}


@dataclass(frozen=True)
class WeightAlgo:
    """name: one of WEIGHT_ALGOS. gptq: GPTQ's settings. calib: the calibration data (unused by rtn)."""

    name: str = "rtn"
    gptq: GptqConfig = field(default_factory=GptqConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)

    def __post_init__(self) -> None:
        if self.name not in WEIGHT_ALGOS:
            raise ValueError(f"--weight_algo {self.name!r}: allowed: {', '.join(WEIGHT_ALGOS)}")
        if not isinstance(self.gptq, GptqConfig) or not isinstance(self.calib, CalibConfig):
            raise ValueError("WeightAlgo.gptq must be a GptqConfig and WeightAlgo.calib a CalibConfig")

    @property
    def needs_calib(self) -> bool:
        return _NEEDS_CALIB[self.name]

    @property
    def next_inputs(self) -> str:
        """What the block after a calibrated one sees (blocks.NEXT_INPUTS)."""
        return self.gptq.next_inputs if self.name == "gptq" else "quantized"

    def to_dict(self) -> dict[str, Any]:
        if self.name == "rtn":
            return {"name": "rtn"}
        return {"name": self.name, "gptq": self.gptq.to_dict(), "calib": dataclasses.asdict(self.calib)}

    def slug(self) -> str:
        """e.g. `gptq-ao-sg-fpin-n32x512` (RTN: empty, so earlier result names stay)."""
        if self.name == "rtn":
            return ""
        g, c = self.gptq, self.calib
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
