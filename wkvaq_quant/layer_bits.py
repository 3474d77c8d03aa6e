"""The resolved per-layer bit table of a plan: decoder block x Linear -> weight / input bits.

A run whose plan gives layers different settings (a mix_bits map) stores this table in its
result file under `"layer_bits"`; the report draws it as a block x layer heatmap.

Layout (JSON):
    {"layers": ["q_proj", ..., "down_proj"],        # column order
     "w_bits": [[16, 4, ...], ...],                # one row per decoder block, one entry per layer
     "a_bits": [[16, 8, ...], ...],
     "w_dtype": [["int", "bitmod", ...], ...]}
Bits >= 16 mean full precision.
"""

from __future__ import annotations

from typing import Any

from .config import LINEAR_NAMES

__all__ = ["LINEAR_LAYERS", "layer_bits_table"]

LINEAR_LAYERS = LINEAR_NAMES


def layer_bits_table(plan: Any, n_blocks: int, layers: tuple[str, ...] = LINEAR_LAYERS,
                     uniform_too: bool = False) -> dict[str, Any] | None:
    """The table of `plan.linear_args(block, layer)` for every block and layer.

    Returns None when every layer has the plan's global settings (nothing to draw), unless
    `uniform_too`.
    """
    if n_blocks <= 0:
        raise ValueError(f"n_blocks must be positive, got {n_blocks}")
    table = [[plan.linear_args(block, layer) for layer in layers] for block in range(n_blocks)]
    if not uniform_too and all((w, a) == (plan.w, plan.a) for row in table for w, a in row):
        return None
    return {"layers": list(layers),
            "w_bits": [[w.bits for w, _ in row] for row in table],
            "a_bits": [[a.bits for _, a in row] for row in table],
            "w_dtype": [[w.dtype for w, _ in row] for row in table]}

