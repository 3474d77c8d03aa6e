"""AWQ's search settings (--n_grid, --search_dtype and the clip search's constants)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AWQ_SEARCH_DTYPES", "SEARCH_DTYPE_HELP", "AwqSearchConfig", "check_search_dtype"]


AWQ_SEARCH_DTYPES: dict[str, torch.dtype | None] = {"model": None, "bfloat16": torch.bfloat16,
                                                    "float16": torch.float16}
"""--search_dtype: "model" runs AWQ's scale search in the model's dtype; a lower dtype computes, for
each Linear, only the change of its output in that dtype, on top of its recorded output (faster on
hardware with fast bfloat16 / float16 products; see wkvaq_quant.weights.awq.auto_scale)."""


SEARCH_DTYPE_HELP = ("the scale search in the model's dtype, or each Linear's output change in a lower dtype on top "
                     "of its recorded output (faster with a float32 model where bfloat16 products are fast, e.g. a "
                     "CPU with AMX; measured in bench/RESULTS.md)")
"""--search_dtype's help, shared by main.py and awq.entry."""


def check_search_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a --search_dtype name (None: the model's)."""
    if name not in AWQ_SEARCH_DTYPES:
        raise ValueError(f"--search_dtype {name!r}: allowed: {', '.join(AWQ_SEARCH_DTYPES)}")
    return AWQ_SEARCH_DTYPES[name]


@dataclass(frozen=True)
class AwqSearchConfig:
    """AWQ's search: `n_grid` grid points for the scale and the clip searches (--n_grid);
    `max_shrink` and `n_sample_token`: the clip search's range and token sample (llm-awq's values);
    `weight_only_search`: ignore the plan's activation quantization in the searches (by default a
    quantized Linear input is quantized there too, as llmc's Awq with an `act` section does);
    `search_dtype`: the scale search's products in the model's dtype ("model") or, for their change
    only, in a lower one (--search_dtype, see AWQ_SEARCH_DTYPES)."""

    n_grid: int = 20
    max_shrink: float = 0.5
    n_sample_token: int = 512
    search_dtype: str = "model"
    weight_only_search: bool = False

    def __post_init__(self) -> None:
        check_search_dtype(self.search_dtype)
        if not isinstance(self.weight_only_search, bool):
            raise ValueError(f"--awq_weight_only_search {self.weight_only_search!r}: allowed: True, False")
        if isinstance(self.n_grid, bool) or not isinstance(self.n_grid, int) or self.n_grid <= 0:
            raise ValueError(f"--n_grid {self.n_grid!r}: allowed: a positive integer")
        if not 0 <= self.max_shrink < 1 or self.n_sample_token <= 0:
            raise ValueError(f"AWQ clip search: max_shrink {self.max_shrink} (allowed: [0, 1)), n_sample_token "
                             f"{self.n_sample_token} (allowed: > 0)")
