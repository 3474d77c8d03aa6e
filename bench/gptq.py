"""GPTQ benchmark on the embedded model: perplexity of FP, RTN and GPTQ at W4 / W3 (INT, group 128)
and the wall time of GPTQ, every run through `main.py` (its own process and result record).

    OMP_NUM_THREADS=1 python bench/gptq.py --write

Calibration comes from wiki_sample's calibration split, perplexity from the first `--n_windows`
windows of its evaluation split (CPU budget). Result records are kept in `--work` and reused
(main.py skips a finished run).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results_md import run_main, write_section  # noqa: E402

SECTION = "## GPTQ (bench/gptq.py)"
SETTINGS = ((4, ()), (4, ("--act_order",)), (3, ()))
"""(bits, extra GPTQ flags) of each GPTQ row."""


def _main_py(args, work: Path, *flags: str) -> dict:
    """main.py's result record for `flags` (plus the process wall time), one results directory each."""
    out = work / "results" / "-".join(f.lstrip("-") for f in flags) if flags else work / "results" / "fp"
    return run_main(["--model", "smollm2-135m", "--n_windows", str(args.n_windows), *flags], out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_windows", type=int, default=8)
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--n_calib", type=int, default=32)
    p.add_argument("--calib_seq_len", type=int, default=512)
    p.add_argument("--work", default="/tmp/wkvaq-bench-gptq", help="finished runs are reused from here")
    p.add_argument("--write", action="store_true", help="update the section in bench/RESULTS.md")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calib = ["--n_calib", str(args.n_calib), "--calib_seq_len", str(args.calib_seq_len)]
    fp = _main_py(args, work)
    rows = ["| weights | RTN ppl | GPTQ ppl | GPTQ vs RTN | GPTQ time | main.py wall time (GPTQ run) |",
            "|---|---:|---:|---:|---:|---:|"]
    for bits, extra in SETTINGS:
        w = ["--w_bits", str(bits), "--w_group_size", str(args.group_size)]
        rtn = _main_py(args, work, *w)
        gptq = _main_py(args, work, *w, "--weight_algo", "gptq", *calib, *extra)
        r, g = rtn["results"]["wiki_sample"]["ppl"], gptq["results"]["wiki_sample"]["ppl"]
        name = f"W{bits} g{args.group_size} int" + "".join(f" {e}" for e in extra)
        print(f"{name}: RTN {r:.3f} GPTQ {g:.3f} in {gptq['weight_algo_s']:.0f} s", flush=True)
        rows.append(f"| {name} | {r:.3f} | {g:.3f} | {g / r:.3f}x | "
                    f"{gptq['weight_algo_s']:.0f} s | {gptq['total_s']:.0f} s |")
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    section = f"""{SECTION}

Embedded SmolLM2-135M (FP32), perplexity on the first {args.n_windows} wiki_sample evaluation windows x 2048
tokens; FP: **{fp['results']['wiki_sample']['ppl']:.3f}**. GPTQ (`main.py --weight_algo gptq`): percdamp 0.01,
lazy batches of 128 columns, act_order where the row says so, true-sequential, next block sees the quantized block; calibration
{args.n_calib} windows x {args.calib_seq_len} tokens from wiki_sample's calibration split (seed 0; the reference
uses 128 x 2048, reduced for the 2-core CPU). Asymmetric INT with an integer zero point, group {args.group_size}.

{chr(10).join(rows)}

GPTQ time: capturing block inputs, the Hessians (four block forwards per block, true-sequential, and one for the next block's inputs) and the
column loop, on the CPU with OMP_NUM_THREADS={threads} (the machine's 2 cores are shared with other work);
main.py wall time adds loading, calibration sampling and the evaluation. llm-compressor's GPTQ: not measured.

    OMP_NUM_THREADS={threads} python bench/gptq.py --n_windows {args.n_windows} --n_calib {args.n_calib} \\
        --calib_seq_len {args.calib_seq_len} --write
"""
    print(section)
    if args.write:
        write_section(SECTION, section)


if __name__ == "__main__":
    main()
