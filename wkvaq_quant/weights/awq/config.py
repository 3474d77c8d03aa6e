"""AwqConfig: the validated settings of one `python -m awq.entry` run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from wkvaq_quant.config import W_DTYPES

from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.mix_bits import load_quant_config
from wkvaq_quant.weights.awq.settings import check_search_dtype

__all__ = ["FLAGS", "AwqConfig"]

FLAGS = {"w.bits": "--w_bit", "w.group_size": "--q_group_size", "w.dtype": "--wq_dtype",
         "w.double_quant": "--use_double_quant"}
"""awq.entry's (llm-awq's) spellings of the weight flags, by QuantPlan field path."""


@dataclass(frozen=True)
class AwqConfig:
    """model: registry name, directory or hub id. w_bit / q_group_size / wq_dtype /
    double_quant: the weight format searched for and applied. config: an llmc-style YAML whose
    mix_bits settings give layers their own format or leave them unquantized (neither scaled
    nor clipped); its quant.method must be Awq (or RTN with --dump_fake only). run_awq: search on calibration
    data; load_awq: apply a cache instead; dump_awq: where the search result goes; dump_fake:
    directory for the fake-quantized checkpoint (without run_awq / load_awq it is plain RTN)."""

    model: str
    w_bit: int = 4
    q_group_size: int = 128
    wq_dtype: str = "int"
    double_quant: bool = False
    run_awq: bool = False
    load_awq: str | None = None
    dump_awq: str | None = None
    dump_fake: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    calib_dataset: str = "wiki_sample"
    n_calib: int = 128
    calib_seq_len: int = 512
    seed: int = 0
    data_dir: str | None = None
    n_grid: int = 20
    search_dtype: str = "model"  # see wkvaq_quant.weights.awq.settings.AWQ_SEARCH_DTYPES
    batch_size: int = 1
    trust_remote_code: bool = False
    config: str | None = None  # llmc-style YAML: per-layer settings (mix_bits) refining the flags
    explicit: tuple = ()  # (main.py flag dest, value) pairs given on the command line, for contradictions
    progress: bool = True

    def __post_init__(self) -> None:
        if self.wq_dtype not in W_DTYPES:
            raise ValueError(f"--wq_dtype {self.wq_dtype!r}: unknown weight format; allowed: {', '.join(W_DTYPES)}")
        if self.w_bit >= 16:
            raise ValueError(f"--w_bit {self.w_bit}: AWQ needs quantized weights; allowed: fewer than 16 bits")
        self.plan()  # bits / group size / double quant checked by QuantArgs (names the flag)
        if self.run_awq and self.load_awq:
            raise ValueError("--run_awq and --load_awq exclude each other: search, or apply a saved search")
        if self.dump_awq and not self.run_awq:
            raise ValueError("--dump_awq needs --run_awq (there is no search result to save otherwise)")
        if not (self.run_awq or self.load_awq or self.dump_fake):
            raise ValueError("nothing to do: give --run_awq [--dump_awq PATH], or --load_awq PATH / --dump_fake DIR")
        if self.run_awq and not (self.dump_awq or self.dump_fake):
            raise ValueError("--run_awq without --dump_awq or --dump_fake would discard the search result")
        if self.load_awq and not Path(self.load_awq).is_file():
            raise ValueError(f"--load_awq {self.load_awq!r}: no such file (make one with --run_awq --dump_awq PATH)")
        if self.dump_fake and Path(self.dump_fake).exists() and any(Path(self.dump_fake).iterdir()):
            raise ValueError(f"--dump_fake {self.dump_fake!r} exists and is not empty; remove it or pick another DIR")
        check_search_dtype(self.search_dtype)
        for flag, v in (("--n_grid", self.n_grid), ("--batch_size", self.batch_size)):
            if v <= 0:
                raise ValueError(f"{flag} {v}: must be positive")

    def plan(self) -> QuantPlan:
        """The weight-only QuantPlan of these flags (per-layer settings come from its linear_args)."""
        plan = QuantPlan.from_flags(w_bits=self.w_bit, w_group_size=self.q_group_size, w_dtype=self.wq_dtype,
                                    flags=FLAGS)
        if self.double_quant:
            try:
                plan = dataclasses.replace(plan, w=plan.w.replace(double_quant=True))
            except ValueError as err:
                raise ValueError(f"--use_double_quant: {err}") from None
        if self.config:
            quant = load_quant_config(self.config)
            rtn_export = quant.method == "RTN" and not (self.run_awq or self.load_awq)
            if quant.method != "Awq" and not rtn_export:
                raise ValueError(f"--config {self.config}: quant.method {quant.method} cannot run in awq.entry; "
                                 f"allowed: quant.method Awq (or RTN with --dump_fake alone)")
            plan = quant.apply(plan, dict(self.explicit), flags=FLAGS)
            if plan.a.enabled or (plan.layers is not None and plan.layers.has_kv):
                raise ValueError(f"--config {self.config}: awq.entry quantizes weights only; the act / k_bits / "
                                 f"v_bits settings belong to main.py (load the result with --awq_model_path_lp)")
        return plan
