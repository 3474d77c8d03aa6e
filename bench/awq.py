"""AWQ benchmark on the embedded model: perplexity of FP, RTN and AWQ at W4 / W3 (INT, BitMoD),
group 128, and the wall time and peak RSS of each AWQ run.

    OMP_NUM_THREADS=1 python bench/awq.py --write

Calibration comes from wiki_sample's calibration split, perplexity from the first `--n_windows`
windows of its evaluation split (CPU budget). Each AWQ run is its own `python -m awq.entry`
process (search + cache + fake-quantized checkpoint), so its wall time and peak RSS are its own;
the checkpoint is then evaluated here. Finished measurements are kept in `--work` and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results_md import DTYPE_NAMES, bf16_note, dtype_flags, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTION = "## AWQ (bench/awq.py)"

from wkvaq_quant.plan import QuantPlan  # noqa: E402
from wkvaq_quant.data import get_eval_windows, resolve_text_source  # noqa: E402
from wkvaq_quant.eval.ppl import evaluate_perplexity  # noqa: E402
from wkvaq_quant.modeling.checkpoint import load_checkpoint_weights  # noqa: E402
from wkvaq_quant.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from wkvaq_quant.results import atomic_write_json  # noqa: E402
from wkvaq_quant.weights.rtn import rtn_quantize  # noqa: E402

SETTINGS = [(4, "int"), (4, "bitmod"), (3, "int"), (3, "bitmod")]


def _suffix(model_dtype: str) -> str:
    """Tag of a model dtype in keys and file names: none for the default float32."""
    return "" if model_dtype == "float32" else f"-{model_dtype}"


def _ppl(windows, weights: str | None = None, plan: QuantPlan | None = None, model_dtype: str = "float32") -> float:
    model, _ = load_model(resolve_model("smollm2-135m"), model_dtype)
    if weights:
        load_checkpoint_weights(model, weights)
    if plan is not None:
        rtn_quantize(model, plan)
    with torch.no_grad():
        return evaluate_perplexity(model, windows, progress=False).ppl


def _search_suffix(search_dtype: str) -> str:
    """Tag of a --search_dtype in keys and file names: none for the default "model"."""
    return "" if search_dtype == "model" else f"-s{search_dtype}"


def _awq_run(args, bits: int, dtype: str, work: Path, group_size: int, model_dtype: str = "float32",
             search_dtype: str = "model") -> dict:
    tag = f"w{bits}-g{group_size}-{dtype}" + _suffix(model_dtype) + _search_suffix(search_dtype)
    out = work / f"fake-{tag}"
    cmd = [sys.executable, "-m", "awq.entry", "--model", "smollm2-135m", "--w_bit", str(bits), "--q_group_size",
           str(group_size), "--wq_dtype", dtype, "--n_calib", str(args.n_calib), "--calib_seq_len",
           str(args.calib_seq_len), "--n_grid", str(args.n_grid), "--batch_size", str(args.n_calib),
           "--run_awq", "--dump_awq", str(work / f"{tag}.pt"), "--dump_fake", str(out), "--no_progress",
           "--search_dtype", search_dtype, *dtype_flags(model_dtype)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    return {"wall_s": time.perf_counter() - t0, "search_s": summary["search_s"],
            "peak_rss_mb": summary["peak_rss_mb"], "checkpoint": str(out), "cache": str(work / f"{tag}.pt")}


class _Store:
    """Finished measurements of one group size, kept in `work` and reused."""

    def __init__(self, args, group_size: int, work: Path) -> None:
        self.path = work / f"results-g{group_size}-n{args.n_calib}x{args.calib_seq_len}-grid{args.n_grid}.json"
        self.res = json.loads(self.path.read_text()) if self.path.exists() else {}

    def done(self, key: str, compute) -> dict:
        if key not in self.res:
            self.res[key] = compute()
            atomic_write_json(self.path, self.res)
            print(f"{key}: {self.res[key]}", flush=True)
        return self.res[key]

    def setting(self, args, windows, work: Path, group_size: int, bits: int, dtype: str,
                model_dtype: str = "float32", search_dtype: str = "model") -> tuple[dict, dict, dict]:
        """(RTN, AWQ, AWQ run) measurements of one setting; `model_dtype` is the model's dtype
        throughout (search and evaluation), `search_dtype` awq.entry's --search_dtype."""
        plan = QuantPlan.from_flags(w_bits=bits, w_group_size=group_size, w_dtype=dtype)
        key = f"w{bits}-{dtype}" + _suffix(model_dtype)
        rtn = self.done(f"rtn-{key}", lambda: {"ppl": _ppl(windows, plan=plan, model_dtype=model_dtype)})
        key += _search_suffix(search_dtype)
        run = self.done(f"awq-run-{key}", lambda: _awq_run(args, bits, dtype, work, group_size, model_dtype,
                                                           search_dtype))
        awq = self.done(f"awq-{key}", lambda: {"ppl": _ppl(windows, weights=run["checkpoint"],
                                                             model_dtype=model_dtype)})
        return rtn, awq, run


def _alpha_agreement(name: str, runs: dict[str, dict]) -> list[str]:
    """How often a lower --search_dtype chose the same scale exponent as the model dtype's search."""
    if "model" not in runs:
        return []
    load = lambda r: torch.load(r["cache"], weights_only=True)["scale"]  # noqa: E731
    ref, out = load(runs["model"]), []
    for sd, run in runs.items():
        if sd != "model":
            got = load(run)
            same = sum(got[k]["alpha"] == v["alpha"] for k, v in ref.items())
            out.append(f"{name}: `--search_dtype {sd}` chose the same alpha as `model` in {same} of {len(ref)} "
                       f"scale groups")
    return out


def _peer_text(args, windows, work: Path) -> str:
    """The side-by-side table with llm-compressor's AWQ (its JSON records from `--peer`, one per
    model dtype)."""
    if not args.peer:
        return ("llm-compressor's AWQ: not measured in this run (`bench/awq_llmcompressor.py` measures it; "
                "its JSON goes to `--peer`).")
    peers = [json.loads(Path(f).read_text()) for f in args.peer]
    rows, cmds, goals, agreement = [], [], [], []
    for f, peer in zip(args.peer, peers):
        for key, ours in (("n_calib", args.n_calib), ("calib_seq_len", args.calib_seq_len), ("n_grid", args.n_grid),
                          ("n_windows", args.n_windows)):
            if peer[key] != ours:
                raise ValueError(f"--peer {f}: {key} {peer[key]} differs from ours ({ours})")
        bits, g, model_dtype = peer["bits"], peer["group_size"], peer.get("dtype", "float32")
        name = f"W{bits} g{g} int, {DTYPE_NAMES[model_dtype]}"
        ours = {sd: _Store(args, g, work).setting(args, windows, work, g, bits, "int", model_dtype, sd)
                for sd in args.search_dtype}
        rtn = next(iter(ours.values()))[0]
        for sd, (_, awq, run) in ours.items():
            rows.append(f"| {name}: ours (`awq.entry --search_dtype {sd}`) | {rtn['ppl']:.3f} | {awq['ppl']:.3f} | "
                        f"{run['search_s']:.0f} s | {run['peak_rss_mb'] / 1024:.2f} GiB |")
        rows.append(f"| {name}: llm-compressor | {rtn['ppl']:.3f} | {peer['ppl']:.3f} | {peer['oneshot_s']:.0f} s | "
                    f"{peer['peak_rss_mb_oneshot'] / 1024:.2f} GiB |")
        for sd, (_, awq, run) in ours.items():
            ratio = run["search_s"] / peer["oneshot_s"]
            rows.append(f"| {name}: ours ({sd}) / llm-compressor | | {awq['ppl'] / peer['ppl']:.3f}x | "
                        f"**{ratio:.2f}x** | |")
            goals.append(f"{DTYPE_NAMES[model_dtype]}, --search_dtype {sd}: {'met' if ratio <= 0.5 else 'not met'} "
                         f"({ratio:.2f}x)")
        agreement.extend(_alpha_agreement(name, {sd: r for sd, (_, _, r) in ours.items()}))
        dflag = "".join(f" {f}" for f in dtype_flags(model_dtype))
        cmds.append(f"    OMP_NUM_THREADS=1 /work/venvs/llmcompressor/bin/python bench/awq_llmcompressor.py --bits {bits} \\\n"
                    f"        --group_size {g} --n_calib {peer['n_calib']} --calib_seq_len {peer['calib_seq_len']} "
                    f"--n_grid {peer['n_grid']} \\\n        --n_windows {peer['n_windows']}{dflag} --out {Path(f).name}")
    p0 = peers[0]
    bf16 = any(p.get("dtype") == "bfloat16" for p in peers)
    bf16_text = (" In BF16 those multiply-adds are cheap and the per-candidate weight quantization, where our "
                 "formats do fewer passes, is a larger share of both runs.") if bf16 else ""
    checks = "; ".join(f"{DTYPE_NAMES[p.get('dtype', 'float32')]} `{p['fake_quant_check']['module']}`: forward "
                       f"equals an independent dequantization to {p['fake_quant_check']['max_abs_err_vs_manual_qdq']:.1e}, "
                       f"differs from the stored FP weight by {p['fake_quant_check']['max_abs_diff_vs_stored_weight']:.2g}"
                       for p in peers)
    nl = "\n"
    return f"""llm-compressor {p0['llmcompressor']} (compressed-tensors {p0['compressed_tensors']}) side by side,
asymmetric INT with an integer zero point (group 128 is refused by compressed-tensors on this model: hidden
576 is not a multiple of 128), the same {p0['n_calib']} x {p0['calib_seq_len']} calibration windows and the same
evaluation windows, both single-threaded on this CPU, each pair in one model dtype (`--dtype` of both: calibration,
search and evaluation). llm-compressor: `AWQModifier(duo_scaling=False,
n_grid={p0['n_grid']})` (scales from the activation magnitude only, as ours and llm-awq; its grid is
i / (n_grid - 1), ours i / n_grid) followed by `QuantizationModifier` with that scheme; it has no clip search,
ours searches a clip per group ({args.n_grid // 2} candidates) after scaling. Its time is the `oneshot` call
(calibration, search, quantization), ours the search of `python -m awq.entry` (calibration forwards, scale and
clip search); peak RSS: our `awq.entry` process (search, cache and checkpoint writing), llm-compressor's
process right after `oneshot` (before the evaluation). Each evaluated llm-compressor model was checked to compute
with its fake-quantized weights ({checks}).

| setting | RTN ppl | AWQ ppl | AWQ time | peak RSS |
|---|---:|---:|---:|---:|
{nl.join(rows)}

Goal (our time at most half of llm-compressor's): {"; ".join(goals)}.
{"".join(f"{a}. " for a in agreement)}
{bf16_note() if bf16 else ""}

Where the time goes (FP32, W4 g64, 8 x 256 tokens, cProfile of 4 blocks): one forward of the block records
the Linears' inputs, the attention / MLP reference outputs and the next block's inputs; o_proj / down_proj losses
come from the weight change alone. The rest is the attention and MLP forwards per grid point over every calibration
token, the multiply-adds llm-compressor's search spends too (FP32 products run at about 30 G multiply-adds/s on one
thread here), so with `--search_dtype model` the ratio stays above 0.5x. `--search_dtype bfloat16` computes each
Linear's output change in bfloat16 (this CPU's AMX runs those products 4-5x faster than float32), and o_proj /
down_proj return only their change (the module's output error); what remains is the attention itself, the
activation, element-wise work and the clip search (llm-compressor has none; about 0.2 s per block, its candidates
clamped through broadcast group views). The ratios come from runs right after the llm-compressor run; on this
shared machine llm-compressor's time varied from 138 s to 234 s between sessions, and peak RSS varies by up to
0.5 GiB between identical runs.{bf16_text} The
g{args.group_size} rows above were measured in an earlier session (before the Gram-matrix clip errors) under a
different load of the shared machine; the pairs here ran back to back.

{nl.join(cmds)}
"""


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_windows", type=int, default=8)
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--n_calib", type=int, default=8)
    p.add_argument("--calib_seq_len", type=int, default=256)
    p.add_argument("--n_grid", type=int, default=10)
    p.add_argument("--work", default="/tmp/wkvaq-bench-awq", help="finished measurements are reused from here")
    p.add_argument("--peer", nargs="+", default=None,
                   help="JSON records written by bench/awq_llmcompressor.py --out (llm-compressor's AWQ); our "
                        "AWQ runs at each one's bits, group size and model dtype for the side-by-side table")
    p.add_argument("--search_dtype", nargs="+", default=["model"],
                   help="our --search_dtype values in the side-by-side table (one AWQ run each)")
    p.add_argument("--write", action="store_true", help="update the section in bench/RESULTS.md")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = _Store(args, args.group_size, work)
    source = resolve_model("smollm2-135m")
    windows = get_eval_windows(resolve_text_source("wiki_sample", "eval"), load_tokenizer(source), 2048,
                               source.add_special_tokens)[: args.n_windows]
    fp = store.done("fp", lambda: {"ppl": _ppl(windows)})
    rows = ["| weights | RTN ppl | AWQ ppl | AWQ vs RTN | AWQ search wall time | AWQ process peak RSS |",
            "|---|---:|---:|---:|---:|---:|"]
    for bits, dtype in SETTINGS:
        rtn, awq, run = store.setting(args, windows, work, args.group_size, bits, dtype)
        rows.append(f"| W{bits} g{args.group_size} {dtype} | {rtn['ppl']:.3f} | {awq['ppl']:.3f} | "
                    f"{awq['ppl'] / rtn['ppl']:.3f}x | {run['search_s']:.0f} s | {run['peak_rss_mb'] / 1024:.2f} GiB |")
    peer_text = _peer_text(args, windows, work)
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    peer_flag = f" --peer {' '.join(Path(f).name for f in args.peer)}" if args.peer else ""
    if args.search_dtype != ["model"]:
        peer_flag += f" --search_dtype {' '.join(args.search_dtype)}"
    section = f"""{SECTION}

Embedded SmolLM2-135M (FP32), perplexity on the first {args.n_windows} wiki_sample evaluation windows x 2048
tokens (a CPU budget, not the full 289); FP: **{fp['ppl']:.3f}**. AWQ calibration: {args.n_calib} windows x
{args.calib_seq_len} tokens from wiki_sample's calibration split (seed 0), {args.n_grid} grid points for the scale
search and {args.n_grid // 2} clip candidates (llm-awq uses 128 x 512 and 20 / 10; reduced for the 2-core CPU),
group 128 (hidden 576 = 4 x 128 + a group of 64; intermediate 1536 = 12 x 128). The embedded model was
stored as 4-bit Q4_1 blocks of 32, so its "FP" weights already sit on a 4-bit grid.

{chr(10).join(rows)}

{peer_text}

Wall time is the search of one `python -m awq.entry` process on the CPU with {threads} intra-op thread(s)
(the machine's 2 cores are shared; 2 threads were 3x slower under that load), peak RSS that process's
maximum resident set (model, calibration activations, cache and checkpoint writing).

    OMP_NUM_THREADS={threads} python bench/awq.py --n_windows {args.n_windows} --n_calib {args.n_calib} \\
        --calib_seq_len {args.calib_seq_len} --n_grid {args.n_grid}{peer_flag} --write
"""
    print(section)
    if args.write:
        write_section(SECTION, section)


if __name__ == "__main__":
    main()
