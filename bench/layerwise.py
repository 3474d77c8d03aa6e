"""Layer-wise quantization memory benchmark: peak RSS of layer-wise RTN / GPTQ versus loading the
model whole and quantizing it, on synthetic Llama-shaped checkpoints (random BF16 weights,
written once, tensor by tensor, to safetensors shards by this script).

    OMP_NUM_THREADS=1 python bench/layerwise.py --sizes 1b,7b --gptq 1b --write

Each measurement is its own process (its peak RSS is its own): `whole` loads the checkpoint with
`from_pretrained` and runs `rtn_quantize` (or `gptq_quantize`); `layer-wise` runs
`main.py --layer_wise --save_quant`. A third process only imports torch, transformers and this
package: the floor under every run. The synthetic checkpoints use the embedded model's tokenizer
(vocabulary 49152), so GPTQ calibrates on real text.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results_md import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Layer-wise quantization memory (bench/layerwise.py)"
SIZES = {  # Llama-shaped, vocabulary of the embedded tokenizer, untied head
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
}
VOCAB = 49152
BOUND_ONLY = {  # Llama-2 13B / 70B shapes (vocabulary 32000): GPTQ's lower bound computed, not measured
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
}


def gptq_bound(shape: dict, floor_mb: float) -> tuple[float, float]:
    """(GiB that any GPTQ run must hold, GiB of the BF16 model) for a Llama `shape`: the import floor,
    one BF16 block (its other weights are needed for the forward after the Linear is done) and, while
    down_proj is quantized, its float32 Hessian and float32 working copy of the weight."""
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    model = n * block + 2 * shape.get("vocab_size", VOCAB) * h + h
    down = 4 * i * i + 4 * h * i
    return (floor_mb * 2**20 + 2 * block + down) / 2**30, 2 * model / 2**30

WRITE = """
import json, math, sys, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from wkvaq_quant.models import load_tokenizer, resolve_model
from wkvaq_quant.weights.safetensors_io import ShardWriter
out, cfg = Path(sys.argv[1]), LlamaConfig(**json.loads(sys.argv[2]))
out.mkdir(parents=True)
with torch.device("meta"):
    shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
shards, cur, size = [], [], 0
for k, shape in shapes.items():
    if cur and size + 2 * math.prod(shape) > 500 * 2**20:
        shards.append(cur); cur, size = [], 0
    cur.append(k); size += 2 * math.prod(shape)
shards.append(cur)
gen, weight_map = torch.Generator().manual_seed(0), {}
for j, names in enumerate(shards):
    name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
    with ShardWriter(out / name, [(k, torch.bfloat16, shapes[k]) for k in names]) as w:
        for k in names:
            t = torch.ones(shapes[k]) if len(shapes[k]) == 1 else torch.randn(shapes[k], generator=gen) * 0.02
            w.write(k, t.to(torch.bfloat16))
            weight_map[k] = name
total = sum(2 * math.prod(s) for s in shapes.values())
(out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                              "weight_map": weight_map}))
cfg.torch_dtype = torch.bfloat16
cfg.save_pretrained(out)
load_tokenizer(resolve_model("smollm2-135m")).save_pretrained(out)
print(sum(math.prod(s) for s in shapes.values()))
"""

WHOLE = """
import json, resource, sys, time
t0 = time.perf_counter()
from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.models import load_model, load_tokenizer, resolve_model
from wkvaq_quant.weights.algo import CalibConfig
plan = QuantPlan.from_flags(w_bits=4, w_group_size=128)
source = resolve_model(sys.argv[1])
model, _ = load_model(source, "bfloat16")
if sys.argv[2] == "rtn":
    from wkvaq_quant.weights.rtn import rtn_quantize
    rtn_quantize(model, plan)
else:
    from wkvaq_quant.data import get_calib_windows, resolve_text_source
    from wkvaq_quant.weights.gptq import gptq_quantize
    n, seq = int(sys.argv[3]), int(sys.argv[4])
    calib = get_calib_windows(resolve_text_source("wiki_sample", "calib"), load_tokenizer(source), n, seq, 0, False)
    gptq_quantize(model, plan, calib, progress=False)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t0}))
"""

BASELINE = """
import json, resource
import transformers, transformers.models.llama.modeling_llama  # noqa: F401
from wkvaq_quant.weights import layerwise  # noqa: F401
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def _last_json(printed: str) -> dict:
    return json.loads(printed.strip().splitlines()[-1])


def _measure(work: Path, size: str, algo: str, n_calib: int, seq: int) -> dict:
    """{"n_params", "gib", "whole", "layer_wise"} of one size and algorithm (cached in `work`)."""
    cached = work / f"{size}-{algo}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    src, out = work / f"synthetic-{size}", work / f"quant-{size}-{algo}"
    if not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        shape = {**SIZES[size], "head_dim": 128 if size == "7b" else 64, "vocab_size": VOCAB,
                 "tie_word_embeddings": False}
        (work / f"{size}-n_params.txt").write_text(_run([sys.executable, "-c", WRITE, str(src),
                                                          json.dumps(shape)]).strip().splitlines()[-1])
    calib = [str(n_calib), str(seq)] if algo == "gptq" else []
    whole = _last_json(_run([sys.executable, "-c", WHOLE, str(src), algo, *calib]))
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    flags = ["--weight_algo", algo] + (["--n_calib", str(n_calib), "--calib_seq_len", str(seq)] if calib else [])
    printed = _run([sys.executable, "main.py", "--model", str(src), "--dtype", "bfloat16", "--w_bits", "4",
                    "--w_group_size", "128", *flags, "--layer_wise", "--save_quant", str(out), "--no_progress"])
    lw = json.loads(printed[printed.index("{\n"):])
    lw["wall_s"] = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    res = {"n_params": int((work / f"{size}-n_params.txt").read_text()),
           "gib": sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**30, "whole": whole, "layer_wise": lw}
    cached.write_text(json.dumps(res))
    return res


def _measure_first_blocks(work: Path, size: str, n_calib: int, seq: int, k: int) -> dict:
    """Layer-wise GPTQ of `size` stopped (SIGKILL) once k blocks are written: its peak RSS and the
    time of each finished block. Every block has the same shapes, so the per-block peak repeats;
    the run is resumable, so stopping it loses nothing but the rest of the work (cached in `work`)."""
    from wkvaq_quant.weights.layerwise import STATE_FILE

    cached = work / f"{size}-gptq-{k}blocks.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    src, out = work / f"synthetic-{size}", work / f"quant-{size}-gptq-partial"
    if not (src / "config.json").is_file():
        raise ValueError(f"--gptq_blocks {size}: measure RTN at {size} first (it writes the synthetic checkpoint)")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "main.py", "--model", str(src), "--dtype", "bfloat16", "--w_bits", "4", "--w_group_size",
           "128", "--weight_algo", "gptq", "--n_calib", str(n_calib), "--calib_seq_len", str(seq), "--layer_wise",
           "--save_quant", str(out), "--no_progress"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_at: list[float] = []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            raise RuntimeError(f"{' '.join(cmd[:4])} ... ended (status {status}) before {k} blocks were written")
        state = out / STATE_FILE
        done = len(json.loads(state.read_text())["done"]) if state.is_file() else 0
        done_at += [time.perf_counter() - t0] * (done - len(done_at))
        if done >= k:
            os.kill(proc.pid, signal.SIGKILL)
            _, _, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(1)
    shutil.rmtree(out, ignore_errors=True)
    res = {"n_params": int((work / f"{size}-n_params.txt").read_text()),
           "gib": sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**30, "blocks": k,
           "block_done_s": done_at, "layer_wise": {"peak_rss_mb": usage.ru_maxrss / 1024}}
    cached.write_text(json.dumps(res))
    return res


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1b", help=f"comma-separated, of {', '.join(SIZES)} (RTN)")
    p.add_argument("--gptq", default="", help="sizes also measured with GPTQ (comma-separated)")
    p.add_argument("--gptq_blocks", default="",
                   help="SIZE:K, e.g. 7b:2: layer-wise GPTQ of SIZE stopped after its first K blocks (peak RSS "
                        "against the whole-model RTN peak of SIZE, a lower bound for any whole-model run)")
    p.add_argument("--n_calib", type=int, default=8)
    p.add_argument("--calib_seq_len", type=int, default=512)
    p.add_argument("--work", default="/tmp/wkvaq-bench-layerwise")
    p.add_argument("--write", action="store_true", help="update the section in bench/RESULTS.md")
    args = p.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    gptq = [s for s in args.gptq.split(",") if s]
    bad = [s for s in sizes + gptq if s not in SIZES]
    if bad:
        p.error(f"--sizes / --gptq {', '.join(bad)}: allowed: {', '.join(SIZES)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = _last_json(_run([sys.executable, "-c", BASELINE]))["peak_rss_mb"]
    rows = ["| checkpoint | algorithm | whole model: peak RSS, time | layer-wise: peak RSS, time | layer-wise vs whole "
            "| above the import floor: layer-wise vs whole |", "|---|---|---:|---:|---:|---:|"]
    for size, algo in [(s, "rtn") for s in sizes] + [(s, "gptq") for s in gptq]:
        r = _measure(work, size, algo, args.n_calib, args.calib_seq_len)
        w, lw = r["whole"], r["layer_wise"]
        ratio = lw["peak_rss_mb"] / w["peak_rss_mb"]
        above = (lw["peak_rss_mb"] - base) / (w["peak_rss_mb"] - base)
        name = "RTN" if algo == "rtn" else f"GPTQ ({args.n_calib} x {args.calib_seq_len} calibration)"
        rows.append(f"| {size}: {r['n_params'] / 1e9:.2f} B params, {r['gib']:.2f} GiB | {name} "
                    f"| {w['peak_rss_mb'] / 1024:.2f} GiB, {w['seconds']:.0f} s "
                    f"| {lw['peak_rss_mb'] / 1024:.2f} GiB, {lw['wall_s']:.0f} s "
                    f"| {ratio:.1%} ({1 - ratio:.1%} less) | {above:.1%} ({1 - above:.1%} less) |")
        print(rows[-1], flush=True)
    partial = ""
    if args.gptq_blocks:
        size, k = args.gptq_blocks.split(":")
        r = _measure_first_blocks(work, size, args.n_calib, args.calib_seq_len, int(k))
        whole = json.loads((work / f"{size}-rtn.json").read_text())["whole"]["peak_rss_mb"]
        lw = r["layer_wise"]["peak_rss_mb"]
        t = r["block_done_s"]
        partial = f"""
Layer-wise GPTQ at {size} ({r['n_params'] / 1e9:.2f} B params, {args.n_calib} x {args.calib_seq_len} calibration),
stopped once its first {r['blocks']} blocks were written (every block has the same shapes, so its per-block peak
repeats; the run is resumable): peak RSS **{lw / 1024:.2f} GiB**, against {whole / 1024:.2f} GiB for the whole-model
RTN run of the same checkpoint, a lower bound for whole-model GPTQ, which holds that model and the Hessians too:
at most {lw / whole:.1%} of it (**{1 - lw / whole:.1%} less**; above the import floor {(lw - base) / (whole - base):.1%}).
Blocks written after {', '.join(f'{x:.0f} s' for x in t)} (the first includes loading and capturing the
calibration inputs).
"""
    shapes = "; ".join(f"{s}: hidden {SIZES[s]['hidden_size']}, intermediate {SIZES[s]['intermediate_size']}, "
                       f"{SIZES[s]['num_hidden_layers']} blocks, {SIZES[s]['num_key_value_heads']} KV heads"
                       for s in dict.fromkeys(sizes + gptq))
    bound = {s: gptq_bound(shape, base)  # (GiB held, GiB of the model) per size
             for s, shape in {**{s: SIZES[s] for s in dict.fromkeys(sizes + gptq)}, **BOUND_ONLY}.items()}
    over = ", ".join(s for s, (b, m) in bound.items() if b / m > 0.1) or "none"
    under = ", ".join(s for s, (b, m) in bound.items() if b / m <= 0.1) or "none"
    bounds = "; ".join(f"{s}: {b:.2f} of {m:.1f} GiB = **{b / m:.1%}**" + ("" if s in SIZES else " (not measured)")
                       for s, (b, m) in bound.items())
    section = f"""{SECTION}

Synthetic Llama-shaped checkpoints, random BF16 weights in safetensors shards of 500 MB, vocabulary {VOCAB},
untied head ({shapes}). W4 g128 asymmetric INT, `--dtype bfloat16`, CPU, OMP_NUM_THREADS=1. Whole model:
`from_pretrained` + `rtn_quantize` / `gptq_quantize` in one process; layer-wise:
`main.py --layer_wise --save_quant DIR` (RTN streams every tensor in row chunks of 8 MiB; GPTQ holds one block,
its calibration activations and the Hessians of its Linears).

| checkpoint | algorithm | whole model: peak RSS, time | layer-wise: peak RSS, time | layer-wise vs whole | above the import floor: layer-wise vs whole |
{chr(10).join(rows[1:])}

The import floor: a process that only imports torch, transformers' Llama and this package peaks at
{base / 1024:.2f} GiB; no run can go below it, so at 1 B parameters it alone is
{base / rows_whole(work, sizes):.0%} of the whole-model run. The last column compares what each run needs above it.
GPTQ's floor is higher: one block, and per Linear its Hessian (8192 x 8192 float32 = 0.25 GiB for
down_proj at 1 B) plus the column loop's working copies, which the whole-model run needs too.
These bound any GPTQ run from below, layer-wise or whole: the import floor, one BF16 block (its other
weights are needed for the forward once a Linear is done) and, while down_proj is quantized, its float32
Hessian and float32 working copy of the weight. As a share of the BF16 model (computed from the shapes):
{bounds}. Where that share is above 10% ({over}), 90% less than loading the model whole is out of reach for
GPTQ by construction; below it ({under}) a layer-wise GPTQ run can meet it.
{partial}
`from_pretrained` memory-maps the shards, so the whole-model peak counts the pages resident at the
time. Times come from a shared 2-core machine (other work ran beside some rows); the memory
columns do not depend on it.

    OMP_NUM_THREADS=1 python bench/layerwise.py --sizes {args.sizes} --gptq {args.gptq or '""'} \\
        {f"--gptq_blocks {args.gptq_blocks} " if args.gptq_blocks else ""}--n_calib {args.n_calib} --calib_seq_len {args.calib_seq_len} --write
"""
    print(section)
    if args.write:
        write_section(SECTION, section)


def rows_whole(work: Path, sizes: list[str]) -> float:
    """Peak RSS (MiB) of the whole-model RTN run of the smallest size measured."""
    return json.loads((work / f"{sizes[0]}-rtn.json").read_text())["whole"]["peak_rss_mb"]


if __name__ == "__main__":
    main()
