"""`--show_plan`: the resolved settings of every (block, decoder Linear) as a text table."""

from __future__ import annotations

from wkvaq_quant.config import LINEAR_NAMES, QuantArgs

from wkvaq_quant.plan import QuantPlan

__all__ = ["LEGEND", "format_plan", "linear_cell", "kv_cell"]

LEGEND = ("W<bits>[g<group>][s|bm|fp4]: weights, INT asymmetric unless s (symmetric INT), bm (BitMoD), "
          "fp4 (FP4 E2M1); g = group size, none = per output channel. A<bits>[g<group>][fp8|a]: inputs per "
          "token, INT symmetric unless fp8 (FP8 E4M3) or a (asymmetric). fp: full precision. "
          "K<bits>V<bits>: KV cache of the block's attention.")
_W_FORMAT = {"bitmod": "bm", "fp4_e2m1": "fp4"}
_A_FORMAT = {"fp8_e4m3": "fp8"}


def _group(args: QuantArgs) -> str:
    return f"g{args.group_size}" if args.group_size != -1 else ""


def linear_cell(w: QuantArgs, a: QuantArgs) -> str:
    """e.g. `W4g128`, `W8/A8`, `W4g128bm/A8fp8`, `fp`."""
    parts = []
    if w.enabled:
        fmt = "s" if w.dtype == "int" and w.symmetric else _W_FORMAT.get(w.dtype, "")
        parts.append(f"W{w.bits}{_group(w)}{fmt}")
    if a.enabled:
        fmt = "a" if a.dtype == "int" and not a.symmetric else _A_FORMAT.get(a.dtype, "")
        parts.append(("" if w.enabled else "W16/") + f"A{a.bits}{_group(a)}{fmt}")
    return "/".join(parts) or "fp"


def kv_cell(plan: QuantPlan) -> str:
    """K and V bits of one block's attention plan (`K4V4`, `K16V4`, `fp`)."""
    k, v = plan.k, plan.v
    return f"K{k.bits}{_group(k)}V{v.bits}{_group(v)}" if (k.enabled or v.enabled) else "fp"


def format_plan(plan: QuantPlan, n_blocks: int) -> str:
    """One row per block, one column per decoder Linear (plus KV when the KV cache is quantized)."""
    show_kv = any(p.k.enabled or p.v.enabled for p in (plan.block_plan(b) for b in range(n_blocks)))
    header = ["block", *LINEAR_NAMES, *(["kv"] if show_kv else [])]
    rows = []
    for b in range(n_blocks):
        row = [str(b), *(linear_cell(*plan.linear_args(b, name)) for name in LINEAR_NAMES)]
        rows.append(row + ([kv_cell(plan.block_plan(b))] if show_kv else []))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join([*lines, "", LEGEND])
