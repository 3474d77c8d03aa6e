"""Families benchmark: weight and KV-cache settings on the second embedded model, Gemma-3-270M.

    python bench/families.py --n_windows 8 --write          # every row, update bench/RESULTS.md

Every setting runs through `main.py` (the command a user types) into a results store under
`--work`, so an interrupted benchmark resumes where it stopped; `--write` renders the rows that
have finished and names the others as not run. Perplexity on the first `--n_windows` wiki_sample
evaluation windows of 2048 tokens; GPTQ and AWQ calibrate on wiki_sample's calibration split
(seed 0) with bench/gptq.py's and bench/awq.py's window counts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results_md import run_main, write_section  # noqa: E402

SECTION = "## Gemma-3-270M and more families"
MODEL = "gemma3-270m"

W4, W3 = "--w_bits 4 --w_group_size 128", "--w_bits 3 --w_group_size 128"
GPTQ = "--weight_algo gptq --n_calib 32 --calib_seq_len 512"
AWQ = "--weight_algo awq --n_calib 8 --calib_seq_len 256"
KV4 = "--k_bits 4 --v_bits 4 --k_group_size 64 --v_group_size 64"
W4A8KV4 = f"{W4} --a_bits 8 --q_bits 8 {KV4}"

# (label, flags, the row it is compared with): in the order they run, the weight rows first
SETTINGS: list[tuple[str, str, str | None]] = [
    ("FP", "", None),
    ("W4 g128 INT asym, RTN", W4, "FP"),
    ("W4 g128 BitMoD, RTN", f"{W4} --w_dtype bitmod", "W4 g128 INT asym, RTN"),
    ("W3 g128 INT asym, RTN", W3, "FP"),
    ("W4 g128 INT asym, GPTQ", f"{W4} {GPTQ}", "W4 g128 INT asym, RTN"),
    ("W4 g128 INT asym, AWQ", f"{W4} {AWQ}", "W4 g128 INT asym, RTN"),
    ("W3 g128 INT asym, GPTQ", f"{W3} {GPTQ}", "W3 g128 INT asym, RTN"),
    ("W3 g128 INT asym, AWQ", f"{W3} {AWQ}", "W3 g128 INT asym, RTN"),
    ("KV4 KTVT g64, pre-RoPE keys (after k_norm)", KV4, "FP"),
    ("KV4 KCVT (32-token groups) + r32", "--k_bits 4 --v_bits 4 --k_group_size 32 --v_group_size 64 "
                                         "--kv_quant_method KCVT --kv_residual_len 32", "FP"),
    ("A8 FP8 E4M3 per token", "--a_bits 8", "FP"),
    ("A8 INT per token", "--a_bits 8 --a_dtype int", "FP"),
    ("W4A8KV4 (Q8)", W4A8KV4, "FP"),
    ("W4A8KV4 (Q8) + k-scale", f"{W4A8KV4} --apply_k_scale", "W4A8KV4 (Q8)"),
]


GOALS = [("W4 g128 INT asym, GPTQ", "W4 g128 INT asym, RTN"), ("W4 g128 INT asym, AWQ", "W4 g128 INT asym, RTN"),
         ("W3 g128 INT asym, GPTQ", "W3 g128 INT asym, RTN"), ("W3 g128 INT asym, AWQ", "W3 g128 INT asym, RTN"),
         ("W4 g128 BitMoD, RTN", "W4 g128 INT asym, RTN")]


def _flags(args, flags: str) -> list[str]:
    return ["--model", MODEL, "--datasets", "wiki_sample", "--n_windows", str(args.n_windows), *flags.split()]


def _results_dir(work: Path, label: str) -> Path:
    return work / "".join(c if c.isalnum() else "_" for c in label)


def _done(work: Path, label: str) -> bool:
    return any(_results_dir(work, label).rglob("*.json"))


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_windows", type=int, default=8)
    p.add_argument("--work", default="/tmp/wkvaq-bench-families", help="finished runs are reused from here")
    p.add_argument("--only_done", action="store_true", help="run nothing: render the rows that have finished")
    p.add_argument("--rows", default=None,
                   help="comma-separated row numbers (1 = FP) to run, in that order; the other finished rows are shown")
    p.add_argument("--write", action="store_true", help="update the section in bench/RESULTS.md")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    order = SETTINGS if args.rows is None else [SETTINGS[int(i) - 1] for i in args.rows.split(",")]
    order += [s for s in SETTINGS if s not in order]  # the rest only where finished
    for n, (label, flags, _) in enumerate(order):
        if (args.only_done or (args.rows is not None and n >= len(args.rows.split(",")))) and not _done(work, label):
            continue
        records[label] = run_main(_flags(args, flags), _results_dir(work, label))
        print(f"{label}: ppl {records[label]['results']['wiki_sample']['ppl']:.3f}", flush=True)
    ppl = {k: r["results"]["wiki_sample"]["ppl"] for k, r in records.items()}
    rows = ["| setting | flags | ppl | vs | ratio | run time |", "|---|---|---:|---|---:|---:|"]
    for label, flags, ref in SETTINGS:
        if label not in ppl:
            rows.append(f"| {label} | `{flags}` | not run | | | |")
            continue
        ratio = f"{ppl[label] / ppl[ref]:.3f}x" if ref in ppl else ""
        rows.append(f"| {label} | `{flags}` | {ppl[label]:.3f} | {ref or ''} | {ratio} | "
                    f"{records[label]['total_s']:.0f} s |")
    goals = []
    for better, worse in GOALS:
        if better in ppl and worse in ppl:
            verdict = "met" if ppl[better] < ppl[worse] else "**not met**"
            goals.append(f"- {better} ({ppl[better]:.3f}) below {worse} ({ppl[worse]:.3f}): {verdict}")
        else:
            goals.append(f"- {better} below {worse}: not measured (a row did not run)")
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    missing = [label for label, _, _ in SETTINGS if label not in ppl]
    status = (f"Rows marked *not run* ({len(missing)} of {len(SETTINGS)}) did not finish within this measurement's CPU "
              f"time (a calibrated row of 8 windows takes up to half an hour on 2 cores: the GPTQ and AWQ "
              f"run times above); the command below runs them, reusing the finished rows from `--work`." if missing else
              "Every row ran.")
    section = f"""{SECTION}

Embedded Gemma-3-270M (base; `--model {MODEL}`, FP32, converted from a Q4_K_M GGUF: Q5_0 / Q4_K / Q6_K / Q8_0
tensors, so "FP" is itself a 4-8-bit model), perplexity on the first {args.n_windows} wiki_sample evaluation
windows x 2048 tokens (BOS first, as Gemma is trained). GPTQ: 32 calibration windows x 512 tokens, AWQ: 8 x 256
(seed 0, wiki_sample's calibration split), the project's defaults otherwise; asymmetric INT with an integer zero
point. "vs": the row the ratio divides by; run time: the run's own `total_s` (loading, calibration,
quantization, evaluation), on the CPU with OMP_NUM_THREADS={threads}; a row reused from `--work` keeps the run time of
the session that ran it (the recorded rows ran one at a time on otherwise idle cores).

{chr(10).join(rows)}

{status}

Goals (GPTQ and AWQ beat RTN at W4 and W3, BitMoD beats INT):

{chr(10).join(goals)}

    OMP_NUM_THREADS={threads} python bench/families.py --n_windows {args.n_windows} --write
"""
    print(section)
    if args.write:
        write_section(SECTION, section)


if __name__ == "__main__":
    main()
