"""Modeling benchmark: perplexity of P3-LLM settings on the embedded model, and the forward
time of W4A8KV4 (p_bits 16 and 8) relative to the FP forward.

    python bench/modeling.py --n_windows 8 --write          # both parts, update bench/RESULTS.md
    python bench/modeling.py --part time --rounds 5          # only the timing

Perplexity: every setting runs through `main.py` (the command a user types) into a results
store under `--results_dir`, so an interrupted benchmark resumes where it stopped. Timing:
one process, one model; FP and quantized forwards interleaved for `--rounds` rounds on the
same 2048-token window, and the median of each is compared, so a busy machine slows both
alike. Weights are quantized once at attach, so the timed forward carries only the
activation, Q/K/V and P work.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results_md import run_main, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Modeling: P3-LLM settings on the embedded model (bench/modeling.py)"

W4 = "--w_bits 4 --w_group_size 128"
A8 = "--a_bits 8"
KV4 = "--k_bits 4 --v_bits 4 --k_group_size 64 --v_group_size 64"
W4A8KV4 = f"{W4} {A8} --q_bits 8 {KV4}"

# (label, flags): the rows of the perplexity table, in order
SETTINGS: list[tuple[str, str]] = [
    ("FP", ""),
    ("W4 g128 INT asym", W4),
    ("W4 g64 INT asym", "--w_bits 4 --w_group_size 64"),
    ("W4 g128 BitMoD", f"{W4} --w_dtype bitmod"),
    ("W3 g128 INT asym", "--w_bits 3 --w_group_size 128"),
    ("W4A8 (A FP8 E4M3 per token)", f"{W4} {A8}"),
    ("KV4 KTVT, pre-RoPE keys", KV4),
    ("KV4 KTVT, post-RoPE keys", f"{KV4} --k_quant_post_rope"),
    ("KV4 KTVT + k-scale, pre-RoPE", f"{KV4} --apply_k_scale"),
    ("KV4 KCVT (32-token groups) + r32", "--k_bits 4 --v_bits 4 --k_group_size 32 --v_group_size 64 "
                                        "--kv_quant_method KCVT --kv_residual_len 32"),
    ("W4A8KV4 (Q8)", W4A8KV4),
    ("W4A8KV4 (Q8) + k-scale", f"{W4A8KV4} --apply_k_scale"),
    ("W4A8KV4 (Q8) + k-scale + P8", f"{W4A8KV4} --apply_k_scale --p_bits 8"),
    ("W4A8KV4 (Q8) + k-scale + P8, no V-scale fold", f"{W4A8KV4} --apply_k_scale --p_bits 8 --no_fold_v_scale"),
    ("KV4 KTVT + k-scale, post-RoPE", f"{KV4} --apply_k_scale --k_quant_post_rope"),
]

TIMED = {
    "W4A8KV4, p_bits 16": (f"{W4A8KV4} --apply_k_scale", 1.3),
    "W4A8KV4, p_bits 8": (f"{W4A8KV4} --apply_k_scale --p_bits 8", 2.0),
}


def _ppl(flags: str, args: argparse.Namespace) -> dict:
    return run_main(["--model", "smollm2-135m", "--datasets", "wiki_sample", "--n_windows", str(args.n_windows),
                     *flags.split()], args.results_dir)


PREVIOUS = "--kv_zero_point float --kv_residual_len 0"
"""The KV defaults before P3-LLM's (KIVI's float zero point, no residual token): with them a row without
its own residual computes exactly what it computed before."""


def _recorded(label: str) -> str:
    """The perplexity this benchmark recorded for `label` in bench/RESULTS.md before, or '-'."""
    from _results_md import RESULTS_MD

    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else ""
    start = text.find(SECTION)
    for line in text[start:].splitlines()[1:] if start >= 0 else []:
        if line.startswith("## "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and cells[0] == label and len(cells) >= 3:
            if len(cells) >= 5 and cells[4] != "-":  # this table's own 'previous defaults' column
                return cells[4].replace(" (recorded)", "")
            return cells[2]  # | setting | flags | ppl | ... of the table before that column
    return "-"


def perplexity_table(args: argparse.Namespace) -> list[str]:
    """Every row with the current defaults; KV rows also with the previous defaults (PREVIOUS), or,
    where the row sets its own residual (whose rule changed), the number recorded before."""
    rows, fp = [], None
    for label, flags in SETTINGS:
        r = _ppl(flags, args)["results"]["wiki_sample"]
        fp = r["ppl"] if fp is None else fp
        previous = "-"
        if "--k_bits" in flags:
            previous = _recorded(label) + " (recorded)" if "--kv_residual_len" in flags \
                else f"{_ppl(f'{flags} {PREVIOUS}', args)['results']['wiki_sample']['ppl']:.3f}"
        rows.append(f"| {label} | `{flags or '(none)'}` | {r['ppl']:.3f} | {r['ppl'] - fp:+.3f} | {previous} |")
        print(rows[-1], flush=True)
    return ["| setting | flags | ppl | vs FP | previous defaults |", "|---|---|---:|---:|---:|", *rows]


SECTION_DEFAULTS = "## P3-LLM's KV defaults against the previous ones (bench/modeling.py --part defaults)"


def defaults_table(args: argparse.Namespace) -> list[str]:
    """The KV rows with the current (P3-LLM's) defaults next to the numbers this benchmark recorded
    with the previous defaults (the modeling section); the first row's previous number is also
    re-run now with PREVIOUS, to show the recorded numbers are what those flags compute."""
    fp = _ppl("", args)["results"]["wiki_sample"]["ppl"]
    rows, checked = [], None
    for label, flags in SETTINGS:
        if "--k_bits" not in flags:
            continue
        now = _ppl(flags, args)["results"]["wiki_sample"]["ppl"]
        before = _recorded(label)
        if checked is None and "--kv_residual_len" not in flags:
            checked = (label, before, _ppl(f"{flags} {PREVIOUS}", args)["results"]["wiki_sample"]["ppl"])
        delta = f"{now - float(before):+.3f}" if before != "-" else "-"
        rows.append(f"| {label} | `{flags}` | {now:.3f} | {now - fp:+.3f} | {before} | {delta} |")
        print(rows[-1], flush=True)
    lines = ["| setting | flags | ppl (P3-LLM's defaults) | vs FP | ppl (previous defaults, recorded) | change |",
             "|---|---|---:|---:|---:|---:|", *rows, ""]
    if checked:
        lines.append(f"Check: `{checked[0]}` with `{PREVIOUS}` re-run now gives {checked[2]:.3f} "
                     f"(recorded: {checked[1]}).")
    return lines


def forward_times(args: argparse.Namespace) -> list[str]:
    import torch

    from wkvaq_quant.cli import build_parser, plan_from_args
    from wkvaq_quant.data import check_datasets, get_eval_windows
    from wkvaq_quant.models import load_model, load_tokenizer, resolve_model
    from wkvaq_quant.modeling import attach

    torch.set_num_threads(args.threads)
    source = resolve_model("smollm2-135m")
    tok = load_tokenizer(source)
    ids = get_eval_windows(check_datasets(["wiki_sample"])["wiki_sample"], tok, 2048, source.add_special_tokens)[:1]
    model, _ = load_model(source)
    plans = {k: plan_from_args(build_parser().parse_args(f.split())) for k, (f, _) in TIMED.items()}
    handles = {k: None for k in plans}

    def forward() -> tuple[float, float]:
        """(CPU seconds of this process, wall seconds) of one forward."""
        cpu, wall = time.process_time(), time.perf_counter()
        with torch.no_grad():
            model(ids)
        return time.process_time() - cpu, time.perf_counter() - wall

    forward()  # warm-up
    times: dict[str, list[tuple[float, float]]] = {"FP": [], **{k: [] for k in plans}}
    for _ in range(args.rounds):
        times["FP"].append(forward())
        for k, plan in plans.items():
            handles[k] = attach(model, plan)  # weights quantized here, outside the timed forward
            forward()  # first forward after attach: transformers re-dispatches attention
            times[k].append(forward())
            handles[k].remove()

    def med(k: str, i: int) -> float:
        return statistics.median(t[i] for t in times[k])

    fp_cpu, fp_wall = med("FP", 0), med("FP", 1)
    lines = ["| forward (1 x 2048 tokens) | CPU time (median) | ratio to FP | goal | wall time (median) | wall ratio |",
             "|---|---:|---:|---|---:|---:|", f"| FP | {fp_cpu:.2f} s | 1.00x | | {fp_wall:.2f} s | 1.00x |"]
    for k, (_, goal) in TIMED.items():
        r = med(k, 0) / fp_cpu
        lines.append(f"| {k} | {med(k, 0):.2f} s | {r:.2f}x | <= {goal}x: {'yes' if r <= goal else 'no'} | "
                     f"{med(k, 1):.2f} s | {med(k, 1) / fp_wall:.2f}x |")
    print("\n".join(lines), flush=True)
    return lines


def fold_saturation(args: argparse.Namespace) -> list[str]:
    """How often V's per-token scale s_v exceeds E4M4's largest value (1.9375): only there can
    P' = P * s_v saturate under the V-scale fold (P <= 1)."""
    import torch

    import wkvaq_quant.modeling.attention as attention
    from wkvaq_quant.plan import QuantPlan
    from wkvaq_quant.data import check_datasets, get_eval_windows
    from wkvaq_quant.formats.prob import UFLOAT_SPECS
    from wkvaq_quant.models import load_model, load_tokenizer, resolve_model
    from wkvaq_quant.modeling import attach

    top = UFLOAT_SPECS[8].max_value
    source = resolve_model("smollm2-135m")
    ids = get_eval_windows(check_datasets(["wiki_sample"])["wiki_sample"], load_tokenizer(source), 2048,
                           source.add_special_tokens)[:1]
    model, _ = load_model(source)
    seen: list = []
    real = attention.quantize_qkv

    def spy(module, q, k, v, fold=False):
        out = real(module, q, k, v, fold=fold)
        if out[4] is not None:
            seen.append(out[4])
        return out

    lines = [f"| V bits (groups of 64 = one head) | max s_v | blocks where some s_v > {top} | token-heads with "
             f"s_v > {top} |", "|---|---:|---:|---:|"]
    attention.quantize_qkv = spy
    try:
        for bits in (4, 3, 2):
            seen.clear()
            handle = attach(model, QuantPlan.from_flags(v_bits=bits, v_group_size=64, p_bits=8))
            with torch.no_grad():
                model(ids)
            handle.remove()
            over = [float((s > top).float().mean()) for s in seen]
            lines.append(f"| {bits} | {max(float(s.max()) for s in seen):.3f} | {sum(o > 0 for o in over)} of "
                         f"{len(seen)} | {100 * sum(over) / len(over):.2f}% |")
    finally:
        attention.quantize_qkv = real
    print("\n".join(lines), flush=True)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "ppl", "time", "fold", "defaults"), default="all",
                   help="defaults: the KV rows with P3-LLM's defaults next to the recorded previous ones, and the "
                        "timing, into their own section")
    p.add_argument("--n_windows", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="interleaved FP / quantized rounds for the timing")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the timing (1: stable ratios on a shared machine)")
    p.add_argument("--results_dir", default=str(ROOT / "results" / "bench-modeling"))
    p.add_argument("--write", action="store_true", help="update the section in bench/RESULTS.md")
    args = p.parse_args()

    import torch

    if args.part == "defaults":
        text = "\n".join([
            SECTION_DEFAULTS, "",
            f"Command: `python bench/modeling.py --part defaults --n_windows {args.n_windows} --rounds {args.rounds} "
            f"--threads {args.threads} --write` ({platform.machine()}, {os.cpu_count()} CPUs, torch "
            f"{torch.__version__}).", "",
            f"Perplexity on the first {args.n_windows} wiki_sample windows x 2048 tokens, FP32. Since 0.2.0 the KV "
            f"defaults are P3-LLM's: KTVT keys and values with the integer zero point, `--kv_residual_len 1` with "
            f"KTVT, and against residual tokens the query and P in full precision. 'previous' is the number the "
            f"modeling section recorded with the defaults before (`{PREVIOUS}`; the KCVT row's own r32 then "
            f"quantized the query and P against the residual tokens).", "",
            *defaults_table(args), "",
            f"Forward time with the new defaults (W4A8KV4 with Q8 and residual 1 now runs the blocked eager "
            f"attention: against the residual token the query stays full precision), FP vs quantized interleaved "
            f"for {args.rounds} rounds in one process (median), one window of 2048 tokens, FP32, {args.threads} "
            f"torch thread(s), process CPU time:", "", *forward_times(args), ""])
        print(text)
        if args.write:
            write_section(SECTION_DEFAULTS, text)
        return

    lines = [SECTION, "",
             f"Command: `python bench/modeling.py --n_windows {args.n_windows} --rounds {args.rounds} "
             f"--threads {args.threads} --write` "
             f"({platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}).", ""]
    if args.part in ("all", "ppl"):
        lines += [f"Perplexity on the first {args.n_windows} wiki_sample windows x 2048 tokens, FP32, each row "
                  f"a `main.py` run with the flags shown (and `--model smollm2-135m --datasets wiki_sample "
                  f"--n_windows {args.n_windows}`). The embedded model's weights were stored as 4-bit Q4_1 "
                  f"(blocks of 32), so its FP baseline already sits on a 4-bit grid and weight-only rows "
                  f"lose less than on an FP16 model. KV rows run with P3-LLM's defaults (the integer zero point, "
                  f"--kv_residual_len 1 with KTVT, the query and P in full precision against residual tokens); "
                  f"'previous defaults' is the same row with `{PREVIOUS}` (the project's defaults before), or, for "
                  f"a row with its own residual length (whose rule changed), the number recorded before.",
                  "", *perplexity_table(args), ""]
    if args.part in ("all", "time"):
        lines += [f"Forward time, FP vs quantized interleaved for {args.rounds} rounds in one process "
                  f"(median), one wiki_sample window of 2048 tokens, FP32, {args.threads} torch thread(s), "
                  f"SDPA for FP and p_bits 16, the blocked eager attention for p_bits 8 (quantized P "
                  f"needs the probabilities). On a shared 2-core machine two OpenMP threads stall on "
                  f"each other in the many small elementwise kernels, so ratios are taken single-threaded, "
                  f"on the process's CPU time (wall time shown too; it carries other jobs' load).",
                  "", *forward_times(args), ""]
    if args.part in ("all", "fold"):
        lines += ["P' = P * s_v under the V-scale fold (the default with `--p_bits` and `--v_bits`): E4M4 "
                  "saturates at 1.9375, so a token whose V scale s_v exceeds it can lose probability mass "
                  "(P > 1.9375 / s_v). Measured on one wiki_sample window of 2048 tokens:", "",
                  *fold_saturation(args), "",
                  "At V4 no scale reaches the limit (the fold costs only P's rounding); at V3 and below some "
                  "tokens can saturate, as the integer-V datapath would: `--no_fold_v_scale` quantizes P "
                  "itself instead.", ""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
