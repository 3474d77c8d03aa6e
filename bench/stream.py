"""Block-streamed evaluation (`main.py --stream_blocks`) against the whole-model evaluation.

    OMP_NUM_THREADS=2 python bench/stream.py --time --rss 1b:4x2048,7b:1x256,13b:1x256 --e2e 7b:1x2048 --write

--time: the embedded model, FP and W4A8KV4, whole-model vs streamed in one run (alternating,
        page cache warm: every checkpoint is read once before), evaluation seconds and the
        process's wall time; and the perplexities (equal).
--rss SIZE:NxT: peak RSS of streamed evaluation of a synthetic Llama-shaped BF16 checkpoint (as
        bench/layerwise.py writes them: random weights, the embedded tokenizer), N windows of T
        tokens, against the bound "import floor + the larger of: one block in the compute dtype,
        its largest BF16 tensor (read before conversion), the windows' hidden states twice (inputs
        and outputs of a block) and one window's activations inside a block; or the head in FP32
        and BF16, the hidden states once and three copies of one window's logits (as in memory)";
        and the whole-model run
        where it fits in this machine's memory: in FP32 with the same windows, else in BF16 with
        one window of 64 tokens (its peak is the weights').
--e2e SIZE:NxT: W4A8KV4 (W4 g128, A8 FP8, KV4, KTVT, residual 1) streamed end to end.

Every run is its own process (its peak RSS is its own); streamed runs compute in FP32
(`--dtype float32`: BF16 matrix products are about 8x slower on this CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results_md import run_main, write_section  # noqa: E402
from layerwise import BASELINE, SIZES, VOCAB, WRITE, _last_json, _run  # noqa: E402

SECTION = "## Block-streamed evaluation (bench/stream.py)"
SHAPES = {**SIZES, "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                               num_attention_heads=40, num_key_value_heads=40)}
W4A8KV4 = ["--w_bits", "4", "--w_group_size", "128", "--a_bits", "8", "--k_bits", "4", "--v_bits", "4",
           "--k_group_size", "128", "--v_group_size", "128"]
MEMORY_GIB = 23.4  # this machine's RAM, less what the system keeps


def _checkpoint(work: Path, size: str) -> Path:
    src = work / f"synthetic-{size}"
    if not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        shape = {**SHAPES[size], "head_dim": SHAPES[size]["hidden_size"] // SHAPES[size]["num_attention_heads"],
                 "vocab_size": VOCAB, "tie_word_embeddings": False}
        _run([sys.executable, "-c", WRITE, str(src), json.dumps(shape)])
    return src


def _block_bytes(shape: dict, elem: int) -> tuple[int, int]:
    """(bytes of one block's tensors at `elem` bytes per value, bytes of its largest BF16 tensor)."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return elem * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h), 2 * h * i


def _bound_mb(shape: dict, floor_mb: float, n: int, t: int) -> float:
    """The stated bound of a streamed FP32 run (see the module docstring), in MiB: the import floor
    plus the larger of the two phases. Blocks: one block in FP32, its largest tensor in BF16 (read
    before conversion), the hidden states of all windows twice (a block's inputs and outputs), one
    window's activations inside a block. Head: the head in FP32 and in BF16, the final hidden
    states once, one window's logits three times (the logits, the shifted copy the loss takes, its
    log-softmax)."""
    h, i, heads, v = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"], VOCAB
    block, largest = _block_bytes(shape, 4)
    hidden = 4 * n * t * h
    acts = 4 * t * (4 * h + 3 * i) + 4 * heads * t * min(t, 64) * 2  # q/k/v/o, gate/up/act, a block of scores
    blocks = block + largest + 2 * hidden + acts
    tail = 6 * v * h + hidden + 3 * 4 * t * v
    return floor_mb + max(blocks, tail) / 2**20


def _spec(text: str) -> tuple[str, int, int]:
    size, _, nt = text.partition(":")
    n, _, t = nt.partition("x")
    if size not in SHAPES or not n.isdigit() or not t.isdigit():
        raise SystemExit(f"bench/stream.py: {text!r}: allowed SIZE:NxT with SIZE in {', '.join(SHAPES)}")
    return size, int(n), int(t)


def _flags(model: Path | str, n: int, t: int, *extra: str) -> list[str]:
    return ["--model", str(model), "--n_windows", str(n), "--seq_len", str(t), "--overwrite", *extra]


def time_rows(work: Path, n: int, reps: int) -> list[str]:
    """Whole-model vs streamed on the embedded model, alternating, `reps` times each."""
    rows = ["| setting | whole model: eval s / wall s | streamed: eval s / wall s | streamed vs whole (eval) "
            "| (wall) | ppl whole / streamed |", "|---|---:|---:|---:|---:|---|"]
    for name, q in (("FP", []), ("W4A8KV4", W4A8KV4)):
        runs: dict[str, list[dict]] = {"whole": [], "stream": []}
        for _ in range(reps):
            for mode in ("whole", "stream"):
                extra = ["--stream_blocks"] if mode == "stream" else []
                runs[mode].append(run_main(_flags("smollm2-135m", n, 2048, *q, *extra), work / f"time-{mode}"))
        ev = {m: min(r["results"]["wiki_sample"]["seconds"] for r in rs) for m, rs in runs.items()}
        wall = {m: min(r["bench_wall_s"] for r in rs) for m, rs in runs.items()}
        ppl = {m: rs[0]["results"]["wiki_sample"]["ppl"] for m, rs in runs.items()}
        rows.append(f"| {name}, {n} x 2048 | {ev['whole']:.1f} / {wall['whole']:.1f} | {ev['stream']:.1f} / "
                    f"{wall['stream']:.1f} | {ev['stream'] / ev['whole']:.3f}x | {wall['stream'] / wall['whole']:.3f}x "
                    f"| {ppl['whole']:.4f} / {ppl['stream']:.4f}{' (equal)' if ppl['whole'] == ppl['stream'] else ''} |")
        print(rows[-1], flush=True)
    return rows


def rss_rows(work: Path, specs: list[str], floor_mb: float, whole_runs: bool = True) -> list[str]:
    rows = ["| checkpoint | windows | streamed (FP32): peak RSS, time | stated bound | whole model: peak RSS "
            "| streamed vs whole |", "|---|---|---:|---:|---:|---:|"]  # noqa: E501
    for text in specs:
        size, n, t = _spec(text)
        src, shape = _checkpoint(work, size), SHAPES[size]
        gib = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**30
        st = run_main(_flags(src, n, t, "--dtype", "float32", "--stream_blocks"), work / "rss")
        bound = _bound_mb(shape, floor_mb, n, t)
        whole, whole_label = None, ""
        if whole_runs and 4 * _n_params(src) / 2**30 * 1.1 < MEMORY_GIB:  # FP32 weights, as streamed, same windows
            whole, whole_label = run_main(_flags(src, n, t, "--dtype", "float32"), work / "rss"), f"FP32, {n} x {t}"
        elif whole_runs and gib * 1.1 < MEMORY_GIB:  # BF16 weights; BF16 products are slow here: one short window
            whole, whole_label = run_main(_flags(src, 1, 64, "--dtype", "bfloat16"), work / "rss"), "BF16, 1 x 64"
        params = _n_params(src)
        w = (f"{whole['peak_rss_mb'] / 1024:.2f} GiB ({whole_label})" if whole
             else "not run" if not whole_runs else f"does not fit ({gib:.1f} GiB of BF16 weights)")
        ratio = f"{st['peak_rss_mb'] / whole['peak_rss_mb']:.1%} ({1 - st['peak_rss_mb'] / whole['peak_rss_mb']:.1%} " \
                f"less)" if whole else "-"
        rows.append(f"| {size}: {params / 1e9:.2f} B params, {gib:.2f} GiB BF16 | {n} x {t} "
                    f"| {st['peak_rss_mb'] / 1024:.2f} GiB, {st['bench_wall_s']:.0f} s | {bound / 1024:.2f} GiB "
                    f"({'within' if st['peak_rss_mb'] <= bound else 'ABOVE'}) | {w} | {ratio} |")
        print(rows[-1], flush=True)
    return rows


def _n_params(src: Path) -> int:
    from wkvaq_quant.weights.safetensors_io import read_entries

    return sum(math.prod(e.shape) for f in src.glob("*.safetensors") for e in read_entries(f).values())


def e2e_rows(work: Path, text: str) -> list[str]:
    size, n, t = _spec(text)
    src = _checkpoint(work, size)
    r = run_main(_flags(src, n, t, "--dtype", "float32", "--stream_blocks", *W4A8KV4), work / "e2e")
    res = r["results"]["wiki_sample"]
    return ["| checkpoint | setting | windows | wall time | peak RSS | ppl (random weights) |", "|---|---|---|---:|---:|---:|",
            f"| {size} synthetic | W4 g128 A8 FP8 KV4 g128 (KTVT, r1), FP32 compute | {n} x {t} "
            f"| {r['bench_wall_s']:.0f} s | {r['peak_rss_mb'] / 1024:.2f} GiB | {res['ppl']:.1f} |"]


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time", action="store_true", help="embedded model: streamed vs whole-model time")
    p.add_argument("--time_windows", type=int, default=4)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--rss", default="", help="SIZE:NxT,...: peak RSS of streamed (and whole-model) runs")
    p.add_argument("--skip_whole", action="store_true", help="--rss: streamed runs only")
    p.add_argument("--e2e", default="", help="SIZE:NxT: a W4A8KV4 streamed run end to end")
    p.add_argument("--work", default="/tmp/wkvaq-bench-layerwise")
    p.add_argument("--write", action="store_true", help="update the section in bench/RESULTS.md")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    floor = _last_json(_run([sys.executable, "-c", BASELINE]))["peak_rss_mb"]
    cmd = "OMP_NUM_THREADS=2 python bench/stream.py " + " ".join(a for a in sys.argv[1:] if a != "--write")
    body = [SECTION, "", f"Command: `{cmd}`. Import floor (torch, transformers, wkvaq imported): {floor / 1024:.2f} GiB.", ""]
    if args.time:
        body += ["Time on the embedded model (SmolLM2-135M, wiki_sample, page cache warm; best of "
                 f"{args.reps} alternating runs):", "", *time_rows(work, args.time_windows, args.reps), ""]
    if args.rss:
        body += ["Peak RSS on synthetic Llama-shaped checkpoints:", "",
                 *rss_rows(work, [s for s in args.rss.split(",") if s], floor, not args.skip_whole), ""]
    if args.e2e:
        body += ["End to end on this machine (2 cores, 24 GB RAM):", "", *e2e_rows(work, args.e2e), ""]
    print("\n".join(body))
    if args.write:
        write_section(SECTION, "\n".join(body))


if __name__ == "__main__":
    main()
