"""Plots of the results store: perplexity vs KV bits per KV mode, block x layer bit heatmaps.

Figures are drawn with matplotlib's object API on an Agg canvas (no global backend switch).
"""

from __future__ import annotations

import re
from pathlib import Path

from .table import protocol_of, setting_of

__all__ = ["kv_series", "plot_kv_bits", "plot_layer_heatmap"]

_KV_TOKEN = re.compile(r"(^|-)k\d+(g-?\d+)?v\d+(g-?\d+)?(?=-|$)")


def _kv_bits(record: dict) -> tuple[int, int]:
    plan = record["config"]["plan"]
    return plan["k"]["bits"], plan["v"]["bits"]


def _pick_dataset(records: list[dict], dataset: str | None) -> str:
    names = sorted({d for r in records for d in r.get("results", {})})
    if dataset is None:
        if not names:
            raise ValueError("no perplexity results to plot")
        return names[0]
    if dataset not in names:
        raise ValueError(f"--plot_dataset {dataset!r}: no result has it; available: {', '.join(names) or 'none'}")
    return dataset


def kv_series(records: list[dict], dataset: str) -> dict[str, list[tuple[float, float]]]:
    """label -> sorted (K bits, ppl) points. A series is one model, protocol and KV mode (everything
    in the setting except the K/V bit widths and group sizes); a mode whose runs pair K and V bits
    differently is split into one series per V width (`..., V2`)."""
    modes: dict[str, list[tuple[int, int, float]]] = {}
    for r in records:
        k, v = _kv_bits(r)
        if min(k, v) >= 16 or dataset not in r.get("results", {}):
            continue
        mode = _KV_TOKEN.sub(r"\1kv*", setting_of(r)).strip("-")
        modes.setdefault(f"{r['model']['name']} {protocol_of(r)}: {mode}", []).append(
            (min(k, 16), min(v, 16), r["results"][dataset]["ppl"]))
    series: dict[str, list[tuple[float, float]]] = {}
    for label, points in modes.items():
        paired = all(k == v for k, v, _ in points)
        for k, v, ppl in points:
            series.setdefault(label if paired else f"{label}, V{v}", []).append((float(k), ppl))
    return {label: sorted(points) for label, points in sorted(series.items())}


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_kv_bits(records: list[dict], path: str | Path, dataset: str | None = None) -> list[str]:
    """Perplexity vs K/V bits, one line per KV mode (see kv_series); the FP perplexity of each model and protocol
    as a dashed horizontal line. Returns the legend's series labels (in drawing order)."""
    dataset = _pick_dataset(records, dataset)
    series = kv_series(records, dataset)
    if not series:
        raise ValueError(f"no result with quantized K or V on {dataset} to plot")
    fig = _new_figure(8, 5)
    ax = fig.add_subplot(1, 1, 1)
    for label, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=label)
    wanted = {label.split(":")[0] for label in series}
    for r in records:
        ref = f"{r['model']['name']} {protocol_of(r)}"
        if setting_of(r) == "fp" and ref in wanted and dataset in r.get("results", {}):
            ax.axhline(r["results"][dataset]["ppl"], linestyle="--", color="gray", linewidth=1)
            ax.annotate(f"FP {ref}", (0.01, r["results"][dataset]["ppl"]), xycoords=("axes fraction", "data"),
                        fontsize=7, color="gray", va="bottom")
    ax.set_xlabel("K bits (= V bits unless the series names V)")
    ax.set_ylabel(f"{dataset} perplexity")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    legend = ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return [t.get_text() for t in legend.get_texts()]  # the series actually drawn


def plot_layer_heatmap(records: list[dict], path: str | Path) -> list[str]:
    """One panel per result that stores a per-layer table (`layer_bits`, see wkvaq_quant.layer_bits):
    blocks down, Linear layers across, colour = weight bits, text = W/A bits. Returns the panel titles."""
    mixed = [r for r in records if r.get("layer_bits")]
    if not mixed:
        raise ValueError("no result has a per-layer bit table (layer_bits): only mix_bits runs store one")
    n = len(mixed)
    blocks = max(len(r["layer_bits"]["w_bits"]) for r in mixed)
    fig = _new_figure(4.5 * n, max(3.0, 0.28 * blocks + 1.5))
    titles = []
    for i, r in enumerate(mixed):
        table = r["layer_bits"]
        ax = fig.add_subplot(1, n, i + 1)
        w = [[min(b, 16) for b in row] for row in table["w_bits"]]
        im = ax.imshow(w, aspect="auto", cmap="viridis", vmin=1, vmax=16, interpolation="nearest")
        for b, row in enumerate(table["w_bits"]):
            for j, wb in enumerate(row):
                ab = table["a_bits"][b][j]
                text = ("fp" if wb >= 16 else str(wb)) + ("" if ab >= 16 else f"/{ab}")
                ax.text(j, b, text, ha="center", va="center", fontsize=6, color="white" if wb < 10 else "black")
        ax.set_xticks(range(len(table["layers"])), table["layers"], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(w)), [str(b) for b in range(len(w))], fontsize=6)
        ax.set_ylabel("decoder block")
        title = f"{r['model']['name']}: {setting_of(r)}"
        ax.set_title(title, fontsize=8)
        titles.append(title)
        fig.colorbar(im, ax=ax, label="weight bits (16 = FP)")
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return titles
