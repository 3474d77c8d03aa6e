"""One row per stored setting, a column per dataset (perplexity) and per lm-eval task, and the
difference to the full-precision row of the same model under the same evaluation protocol."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..data import EVAL_DATASETS

__all__ = ["Row", "Table", "load_records", "build_table", "format_markdown", "format_csv", "setting_of",
           "protocol_of"]

FP_SETTING = "fp"


def load_records(root: str | Path, warn=lambda msg: print(msg, file=sys.stderr)) -> list[dict]:
    """Every result file under `root` (recursively; temporary `.name.tmp` files skipped), sorted by path."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"results directory {str(root)!r} does not exist")
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*.json") if not p.name.startswith("."))
    records = []
    for path in paths:
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            warn(f"[report] skipping {path}: {err}")
            continue
        if not isinstance(rec, dict) or not {"model", "config", "slug"} <= rec.keys():
            warn(f"[report] skipping {path}: not a wkvaq result file")
            continue
        why = _field_problem(rec)
        if why:
            warn(f"[report] skipping {path}: {why}")
            continue
        rec["_path"] = str(path)
        records.append(rec)
    return records


def _field_problem(rec: dict) -> str | None:
    """A field of a result record whose type the report cannot use (None when all are fine)."""
    def num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    model, config, results = rec["model"], rec["config"], rec.get("results", {})
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        return "model.name is not a string"
    if not isinstance(config, dict) or not isinstance(config.get("dtype"), str) or not num(config.get("seq_len")) \
            or not (config.get("n_windows") is None or num(config.get("n_windows"))):
        return "config.dtype / seq_len / n_windows have the wrong types"
    if not isinstance(rec["slug"], str):
        return "slug is not a string"
    if not isinstance(results, dict) or not all(isinstance(r, dict) and num(r.get("ppl")) for r in results.values()):
        return "results is not a mapping of datasets to records with a numeric ppl"
    if not isinstance(rec.get("tasks", {}), dict):
        return "tasks is not a mapping"
    return None


def protocol_of(record: dict) -> str:
    """The evaluation protocol: dtype, window length and window count (rows compare only within one)."""
    c = record["config"]
    n = c.get("n_windows")
    return f"{c['dtype']} seq{c['seq_len']} nw{n if n is not None else 'all'}"


def setting_of(record: dict) -> str:
    """The quantization part of the slug (`fp`, `w4g128-a8fp8-k4v4-KTVT`, ...)."""
    c = record["config"]
    slug = re.sub(r"-[0-9a-f]{8}$", "", record["slug"])
    head, sep, _ = slug.partition(f"-{c['dtype']}-seq{c['seq_len']}")
    return head if sep else slug


@dataclass(frozen=True)
class Row:
    model: str
    setting: str
    protocol: str
    values: dict[str, float]                                  # column -> value
    deltas: dict[str, float] = field(default_factory=dict)    # column -> value - FP value
    path: str = ""

    @property
    def is_fp(self) -> bool:
        return self.setting == FP_SETTING


@dataclass(frozen=True)
class Table:
    columns: list[str]  # metric columns, in order
    rows: list[Row]


def _metric_values(record: dict) -> dict[str, float]:
    values = {name: r["ppl"] for name, r in record.get("results", {}).items()}
    for key, t in record.get("tasks", {}).items():
        values[f"{key} ({t['primary']})"] = t["metrics"][t["primary"]]
    return values


def _column_order(columns: set[str]) -> list[str]:
    ppl = [d for d in EVAL_DATASETS if d in columns]
    return ppl + sorted(c for c in columns if c not in ppl)


def build_table(records: list[dict]) -> Table:
    """Rows sorted by model, protocol, FP first, then setting; deltas against the FP row with the
    same model and protocol (none when there is no such row)."""
    rows = [Row(model=r["model"]["name"], setting=setting_of(r), protocol=protocol_of(r),
                values=_metric_values(r), path=r.get("_path", "")) for r in records]
    fp = {(r.model, r.protocol): r for r in rows if r.is_fp}
    out = []
    for r in rows:
        ref = fp.get((r.model, r.protocol))
        deltas = {} if ref is None or r.is_fp else {
            c: v - ref.values[c] for c, v in r.values.items() if c in ref.values}
        out.append(Row(r.model, r.setting, r.protocol, r.values, deltas, r.path))
    out.sort(key=lambda r: (r.model, r.protocol, not r.is_fp, r.setting))
    columns = _column_order({c for r in out for c in r.values})
    return Table(columns=columns, rows=out)


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return ""
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def format_markdown(table: Table) -> str:
    head = ["model", "setting", "eval"]
    for c in table.columns:
        head += [c, f"Δ {c}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (2 * len(table.columns))]
    for r in table.rows:
        cells = [r.model, r.setting, r.protocol]
        for c in table.columns:
            cells += [_fmt(r.values.get(c)), _fmt(r.deltas.get(c), signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["model", "setting", "eval"]
    for c in table.columns:
        head += [c, f"delta {c}"]
    w.writerow(head)
    for r in table.rows:
        cells = [r.model, r.setting, r.protocol]
        for c in table.columns:
            cells += [repr(r.values[c]) if c in r.values else "", repr(r.deltas[c]) if c in r.deltas else ""]
        w.writerow(cells)
    return buf.getvalue()
