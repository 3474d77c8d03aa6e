"""GPTQ benchmark on the embedded model: perplexity of FP, RTN and GPTQ at W4 / W3 (INT, group 128)
and the wall time of GPTQ, every run through `main.py` (its own process and result record).

    OMP_NUM_THREADS=1 python bench/gptq.py --write

Calibration comes from wiki_sample's calibration split, perplexity from the first `--n_windows`
windows of its evaluation split (CPU budget). Result records are kept in `--work` and reused
(main.py skips a finished run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results_md import DTYPE_NAMES, bf16_note, dtype_flags, run_main, write_section  # noqa: E402

SECTION = "## GPTQ (bench/gptq.py)"
SETTINGS = ((4, ()), (4, ("--act_order",)), (3, ()))
"""(bits, extra GPTQ flags) of each GPTQ row."""


def _results_dir(work: Path, *flags: str) -> Path:
    """The results directory of main.py's run with `flags`, one per set of flags."""
    return work / "results" / ("-".join(f.lstrip("-") for f in flags) if flags else "fp")


def _main_py(args, work: Path, *flags: str) -> dict:
    """main.py's result record for `flags` (plus the process wall time)."""
    return run_main(["--model", "smollm2-135m", "--n_windows", str(args.n_windows), *flags], _results_dir(work, *flags))


PEER_FLAGS = {"none": ((), ("--static_groups",)), "static": (("--act_order", "--static_groups"),)}
"""Our GPTQ flags compared with each llm-compressor actorder. llm-compressor always takes group
parameters from the original weight, so "none" is matched exactly by our `--static_groups` (our
default chooses them from the updated columns), and "static" (= "weight": act order, each column keeps
its own group) by our `--act_order --static_groups`."""


def _peer_name(peer: dict) -> str:
    """The file name the commands in RESULTS.md give a peer record."""
    suffix = "" if peer.get("dtype", "float32") == "float32" else f"-{peer['dtype']}"
    return f"peer-gptq-w{peer['bits']}-{peer['actorder']}{suffix}.json"


def _main_py_done(work: Path, *flags: str) -> bool:
    """Whether main.py's run with `flags` already has a record in `work` (see _main_py)."""
    return any(_results_dir(work, *flags).rglob("*.json"))


def _commit(record: dict) -> str:
    """The git commit main.py ran at (the code a time was measured with)."""
    return record.get("versions", {}).get("git_commit") or "?"


def _peer_text(args, work: Path, calib: list[str]) -> str:
    """Side-by-side rows with llm-compressor's GPTQ (JSON records from `--peer`), our runs at the
    same bits, group size and ordering."""
    if not args.peer:
        return "llm-compressor's GPTQ: not measured in this run (`bench/gptq_llmcompressor.py`; JSON to `--peer`)."
    seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else []
    spreads: list[float] = []  # per row with seeds: max - min of our perplexity over the draws
    seed_col = f" GPTQ ppl ours, calibration seed {', '.join(map(str, seeds))} |" if seeds else ""
    rows = ["| setting | RTN ppl | GPTQ ppl ours | GPTQ ppl llm-compressor | GPTQ time ours | GPTQ time "
            "llm-compressor | time ours / theirs | peak RSS ours | peak RSS llm-compressor | commit |" + seed_col,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|" + ("---:|" if seeds else "")]
    ours_modes = [(), ("--gptq_single_pass",)] if args.single_pass else [()]
    peers = [json.loads(Path(f).read_text()) for f in args.peer]
    for peer in peers:
        for key, ours in (("n_calib", args.n_calib), ("calib_seq_len", args.calib_seq_len),
                          ("n_windows", args.n_windows)):
            if peer[key] != ours:
                raise ValueError(f"--peer: {key} {peer[key]} differs from ours ({ours})")
        bits, g, order, dtype = peer["bits"], peer["group_size"], peer["actorder"], peer.get("dtype", "float32")
        w = ["--w_bits", str(bits), "--w_group_size", str(g), *dtype_flags(dtype)]
        rtn = _main_py(args, work, *w)["results"]["wiki_sample"]["ppl"]
        for j, flags in enumerate(f + mode for f in PEER_FLAGS[order] for mode in ours_modes):
            needed = not args.single_pass or j == 1  # with --single_pass: the first flags' single pass
            if not needed and not _main_py_done(work, *w, "--weight_algo", "gptq", *calib, *flags):
                continue  # other rows are shown where --work has them
            ours = _main_py(args, work, *w, "--weight_algo", "gptq", *calib, *flags)
            name = (f"W{bits} g{g} int, {DTYPE_NAMES[dtype]}: actorder {order} / ours "
                    f"{' '.join(f'`{f}`' for f in flags) or 'default'}")
            rows.append(f"| {name} | {rtn:.3f} | {ours['results']['wiki_sample']['ppl']:.3f} | {peer['ppl']:.3f} | "
                        f"{ours['weight_algo_s']:.0f} s | {peer['oneshot_s']:.0f} s | "
                        f"{ours['weight_algo_s'] / peer['oneshot_s']:.2f}x | {ours['peak_rss_mb'] / 1024:.2f} GiB | "
                        f"{peer['peak_rss_mb_oneshot'] / 1024:.2f} GiB | {_commit(ours)} |")
            if seeds:  # the spread of one setting over calibration draws (seed 0 is the row's own)
                other = [_main_py(args, work, *w, "--weight_algo", "gptq", *calib, *flags, "--seed", str(v))
                         for v in seeds] if needed else []
                rows[-1] += " " + ", ".join(f"{o['results']['wiki_sample']['ppl']:.3f}" for o in other) + " |"
                if other:
                    ppls = [r["results"]["wiki_sample"]["ppl"] for r in (ours, *other)]
                    spreads.append(max(ppls) - min(ppls))
    p0 = peers[0]
    checks = "; ".join(f"{p['fake_quant_check']['module']} (W{p['bits']}, {p['actorder']}, "
                       f"{DTYPE_NAMES[p.get('dtype', 'float32')]}): "
                       f"{p['fake_quant_check']['max_abs_err_vs_manual_qdq']:.1e}" for p in peers)
    seed_text = (f" The last column reruns our single pass with other calibration draws (`--seed`): GPTQ's perplexity on "
                 f"these {args.n_windows} windows moves by up to {max(spreads):.3f} between draws of one setting "
                 f"({', '.join(f'{v:.3f}' for v in spreads)}), so a difference of that size between ours and "
                 f"llm-compressor is within the noise of one draw.") if spreads else ""
    cmds = "\n".join(f"    OMP_NUM_THREADS=1 /work/venvs/llmcompressor/bin/python bench/gptq_llmcompressor.py "
                     f"--bits {p['bits']} --group_size {p['group_size']} --actorder {p['actorder']} \\\n"
                     f"        --n_calib {p['n_calib']} --calib_seq_len {p['calib_seq_len']} "
                     f"--n_windows {p['n_windows']}{' '.join(['', *dtype_flags(p.get('dtype', 'float32'))])} "
                     f"--out {_peer_name(p)}" for p in peers)
    return f"""llm-compressor {p0['llmcompressor']} (compressed-tensors {p0['compressed_tensors']}) side by side:
`GPTQModifier(block_size=128, dampening_frac=0.01, actorder=...)` with an explicit QuantizationScheme (asymmetric
INT, integer zero point, the bits and group size of the row; group 128 is refused by compressed-tensors on this
model since hidden 576 is not a multiple of 128), the same {p0['n_calib']} x {p0['calib_seq_len']} calibration windows and
evaluation windows, both single-threaded on this CPU, each pair in one model dtype (`--dtype` of both:
calibration, GPTQ's forwards and the evaluation; Hessians and the column loop are float32 in both). llm-compressor takes every group's parameters from
the original weight before GPTQ starts, so its actorder none is matched exactly by our `--static_groups` (our
default chooses them from the error-updated columns when the group starts, as the reference GPTQ) and its
actorder "static" (= "weight") by our `--act_order --static_groups`; it has no dynamic ordering for GPTQ. Its time is the `oneshot` call (calibration forwards, Hessians, GPTQ), ours `weight_algo_s` of
main.py (the same work, but true-sequential: by default per block one pass per group of Linears for the
Hessians, each forward stopped at the group's last Linear, and one forward for the next block's inputs; with
`--gptq_single_pass` one forward per block, paused at each group while it is quantized, whose end gives the next
block's inputs: bit-identical weights, so the same perplexity; llm-compressor takes all Hessians of a block from one
forward of the unquantized block and runs one forward to propagate). Rows without `--gptq_single_pass` are shown
where they were measured (see their commit). Peak RSS: main.py's
whole process (evaluation included), llm-compressor's process after `oneshot`. Each evaluated llm-compressor
model was checked to compute with its fake-quantized weights (forward vs an independent dequantization, max abs
difference: {checks}).

{chr(10).join(rows)}

{bf16_note()}{seed_text}

{cmds}
"""


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_windows", type=int, default=8)
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--n_calib", type=int, default=32)
    p.add_argument("--calib_seq_len", type=int, default=512)
    p.add_argument("--work", default="/tmp/wkvaq-bench-gptq", help="finished runs are reused from here")
    p.add_argument("--peer", nargs="+", default=None,
                   help="JSON records written by bench/gptq_llmcompressor.py --out (llm-compressor's GPTQ); our "
                        "GPTQ runs at the same bits, group size and ordering for the side-by-side table")
    p.add_argument("--single_pass", action="store_true",
                   help="side-by-side rows with --gptq_single_pass (one paused forward per block) for the first "
                        "flags of each actorder; other rows are shown where --work has them")
    p.add_argument("--seeds", default=None,
                   help="comma-separated calibration seeds: the side-by-side single-pass rows also run ours with "
                        "each (the perplexity's spread over calibration draws)")
    p.add_argument("--write", action="store_true", help="update the section in bench/RESULTS.md")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calib = ["--n_calib", str(args.n_calib), "--calib_seq_len", str(args.calib_seq_len)]
    fp = _main_py(args, work)
    rows = ["| weights | RTN ppl | GPTQ ppl | GPTQ vs RTN | GPTQ time | main.py wall time (GPTQ run) | commit |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for bits, extra in SETTINGS:
        w = ["--w_bits", str(bits), "--w_group_size", str(args.group_size)]
        rtn = _main_py(args, work, *w)
        gptq = _main_py(args, work, *w, "--weight_algo", "gptq", *calib, *extra)
        r, g = rtn["results"]["wiki_sample"]["ppl"], gptq["results"]["wiki_sample"]["ppl"]
        name = f"W{bits} g{args.group_size} int" + "".join(f" {e}" for e in extra)
        print(f"{name}: RTN {r:.3f} GPTQ {g:.3f} in {gptq['weight_algo_s']:.0f} s", flush=True)
        rows.append(f"| {name} | {r:.3f} | {g:.3f} | {g / r:.3f}x | "
                    f"{gptq['weight_algo_s']:.0f} s | {gptq['total_s']:.0f} s | {_commit(gptq)} |")
    peer_text = _peer_text(args, work, calib)
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    peer_flag = ((" --peer peer-gptq-*.json" if args.peer else "") + (" --single_pass" if args.single_pass else "")
                 + (f" --seeds {args.seeds}" if args.seeds else ""))
    section = f"""{SECTION}

Embedded SmolLM2-135M (FP32), perplexity on the first {args.n_windows} wiki_sample evaluation windows x 2048
tokens; FP: **{fp['results']['wiki_sample']['ppl']:.3f}**. GPTQ (`main.py --weight_algo gptq`): percdamp 0.01,
lazy batches of 128 columns, act_order where the row says so, true-sequential, next block sees the quantized block; calibration
{args.n_calib} windows x {args.calib_seq_len} tokens from wiki_sample's calibration split (seed 0; the reference
uses 128 x 2048, reduced for the 2-core CPU). Asymmetric INT with an integer zero point, group {args.group_size}.

{chr(10).join(rows)}

GPTQ time: capturing block inputs, the Hessians (per block one pass per true-sequential group, each
forward stopped at the group's last Linear, and one full forward for the next block's inputs) and the column loop, on the CPU with OMP_NUM_THREADS={threads} (the machine's 2 cores are shared with other work);
main.py wall time adds loading, calibration sampling and the evaluation; commit: the code the run used (from
0cfce6a on, each Hessian pass stops at its group's last Linear and Linears fed one input share one
accumulation: bit-identical weights in less time, see bench/gptq_block_time.py).

    OMP_NUM_THREADS={threads} python bench/gptq.py --n_windows {args.n_windows} --n_calib {args.n_calib} \\
        --calib_seq_len {args.calib_seq_len}{peer_flag} --write

{peer_text}"""
    print(section)
    if args.write:
        write_section(SECTION, section)


if __name__ == "__main__":
    main()
