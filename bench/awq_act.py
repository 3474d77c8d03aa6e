"""AWQ with quantized activations (llmc's `method: Awq` with an `act` section) on the embedded model:
the activation-aware search (default) against the weight-only search (--awq_weight_only_search)
and RTN, on the same windows and calibration draw.

    python bench/awq_act.py --n_windows 4 --n_calib 32 --write

Settings: the shipped W4A4 mix_bits configs 3 and 4 (configs/w4a4_down_proj_w8a8.yml and
configs/w4a4_mixed_everything.yml) with `method: RTN` replaced by `Awq` (for the AWQ rows: a copy
written into the results directory; config 4 names blocks up to 27, all within the embedded
model's 30, so nothing is removed), and W8A8 from flags (INT per channel / INT per token). Every row is one `main.py` run into --results_dir
(resumable).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results_md import ROOT, run_main, write_section  # noqa: E402

SECTION = "## AWQ with quantized activations (bench/awq_act.py)"

SETTINGS = {  # label -> (flags, YAML config or None)
    "config 3: W4A4, down_proj W8A8": ([], "w4a4_down_proj_w8a8.yml"),
    "config 4: W4A4 mixed": ([], "w4a4_mixed_everything.yml"),
    "W8A8 INT (per channel / per token)": (["--w_bits", "8", "--a_bits", "8", "--a_dtype", "int"], None),
}
METHODS = {"RTN": [], "AWQ weight-only search": ["--weight_algo", "awq", "--awq_weight_only_search"],
           "AWQ activation-aware search": ["--weight_algo", "awq"]}


def _config(name: str, method: str, out: Path) -> Path:
    """The shipped config, or a copy of it with `method: Awq` for the AWQ rows."""
    src = ROOT / "configs" / name
    if method == "RTN":
        return src
    text = src.read_text()
    if "  method: RTN\n" not in text:
        raise SystemExit(f"{src}: expected 'method: RTN' to replace")
    dst = out / "configs" / name.replace(".yml", "-awq.yml")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text.replace("  method: RTN\n", "  method: Awq\n"))
    return dst


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_windows", type=int, default=4)
    p.add_argument("--n_calib", type=int, default=32)
    p.add_argument("--calib_seq_len", type=int, default=512)
    p.add_argument("--n_grid", type=int, default=20)
    p.add_argument("--results_dir", default="results/bench_awq_act")
    p.add_argument("--write", action="store_true", help="replace this section of bench/RESULTS.md")
    args = p.parse_args()
    out = ROOT / args.results_dir
    common = ["--model", "smollm2-135m", "--datasets", "wiki_sample", "--n_windows", str(args.n_windows),
              "--n_calib", str(args.n_calib), "--calib_seq_len", str(args.calib_seq_len), "--n_grid", str(args.n_grid)]
    rows = ["| setting | " + " | ".join(METHODS) + " | activation-aware <= weight-only |", "|---|" + "---:|" * len(METHODS)
            + "---|"]
    fp = run_main(["--model", "smollm2-135m", "--datasets", "wiki_sample", "--n_windows", str(args.n_windows)], out)
    for label, (flags, yml) in SETTINGS.items():
        ppl = {}
        for method, mflags in METHODS.items():
            if yml is None:
                row = [*flags, *mflags]
            else:  # the YAML's method selects the algorithm; the weight-only switch stays a flag
                row = ["--config", str(_config(yml, method, out)), *[f for f in mflags if f == "--awq_weight_only_search"]]
            rec = run_main([*common, *row], out)
            ppl[method] = rec["results"]["wiki_sample"]["ppl"]
            print(f"{label} | {method}: {ppl[method]:.3f} ({rec['bench_wall_s']:.0f} s)", flush=True)
        ok = ppl["AWQ activation-aware search"] <= ppl["AWQ weight-only search"]
        rows.append(f"| {label} | " + " | ".join(f"{ppl[m]:.3f}" for m in METHODS) + f" | {'yes' if ok else 'no'} |")
    text = "\n".join([
        SECTION, "",
        f"Command: `python bench/awq_act.py --n_windows {args.n_windows} --n_calib {args.n_calib} "
        f"--calib_seq_len {args.calib_seq_len} --n_grid {args.n_grid} --write`.",
        "",
        f"Perplexity on the first {args.n_windows} wiki_sample windows x 2048 tokens of the embedded model (FP32; "
        f"FP {fp['results']['wiki_sample']['ppl']:.3f}), {args.n_calib} x {args.calib_seq_len} calibration tokens "
        f"(seed 0), n_grid {args.n_grid}. Configs 3 and 4 are the shipped W4A4 YAMLs; their AWQ rows use a copy with "
        f"`method: Awq` (what llmc runs for such a file; config 4's block indices all lie within the model's 30 "
        f"blocks, so none is removed). The activation-aware search feeds each scaled Linear its quantized input "
        f"Q_a(x / s) (llmc's search_scale_subset) and its clip search the quantized input; the weight-only search "
        f"ignores the activation setting. The embedded model's weights sit on a Q4_1 grid (see the foundation "
        f"section), which flatters RTN at 4 bits.",
        "", *rows, ""])
    print(text)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
