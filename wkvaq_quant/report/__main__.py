"""python -m wkvaq_quant.report RESULTS_DIR [--format md|csv] [--plot out.png] [--heatmap out.png]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .plots import plot_kv_bits, plot_layer_heatmap
from ..userfiles import run_cli
from .table import build_table, format_csv, format_markdown, load_records

FORMATS = {"md": format_markdown, "csv": format_csv}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m wkvaq_quant.report",
                                description="Compare stored results: one row per setting, delta vs FP.")
    p.add_argument("results_dir", nargs="?", default="results", help="results store root (or one result file)")
    p.add_argument("--format", default="md", choices=sorted(FORMATS), help="table format")
    p.add_argument("--model", default=None, help="only rows of this model name")
    p.add_argument("--plot", default=None, help="write perplexity vs K/V bits per KV mode to this PNG")
    p.add_argument("--plot_dataset", default=None, help="dataset of the --plot (default: first by name)")
    p.add_argument("--heatmap", default=None, help="write the block x layer bit heatmap of mix_bits runs to this PNG")
    args = p.parse_args(argv)
    for flag, out in (("--plot", args.plot), ("--heatmap", args.heatmap)):  # before any work
        if out and not Path(out).resolve().parent.is_dir():
            print(f"error: {flag} {out}: the directory {Path(out).resolve().parent} does not exist", file=sys.stderr)
            return 2
    return run_cli(lambda: _report(args), argv)


def _report(args: argparse.Namespace) -> int:
    try:
        records = load_records(args.results_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.model:
        records = [r for r in records if r["model"]["name"] == args.model]
    if not records:
        print(f"error: no result files under {args.results_dir}" + (f" for --model {args.model}" if args.model else ""),
              file=sys.stderr)
        return 2
    print(FORMATS[args.format](build_table(records)).rstrip("\n"))
    try:
        if args.plot:
            labels = plot_kv_bits(records, args.plot, args.plot_dataset)
            print(f"[report] wrote {args.plot} ({len(labels)} series)", file=sys.stderr)
        if args.heatmap:
            titles = plot_layer_heatmap(records, args.heatmap)
            print(f"[report] wrote {args.heatmap} ({len(titles)} panels)", file=sys.stderr)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
