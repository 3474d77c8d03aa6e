"""The CUDA check: every path of the toolkit on one GPU, in FP16 and BF16, against CPU FP32 where
they must agree, with timings. Run by bench/gpu_check.sh (at most 10 minutes on one GPU, no
downloads: every checkpoint is written here, with random weights, and every window is random
token ids from a fixed seed).

Models: the embedded SmolLM2-135M when its converted checkpoint is available, else a
SmolLM2-shaped random checkpoint (the embedded model's 98 MB GGUF does not travel to every GPU
machine); a synthetic Llama-2-7B-shaped BF16 checkpoint for streaming and timing.

Checks (each PASS / FAIL / SKIP with its numbers):
- per dtype and attention (sdpa, eager, flash_attention_2 when flash-attn is installed): FP, W4
  g128, W4A8KV4 (A8 FP8, Q8, KV4 g128 KTVT, k-scale), KV2 KCVT with 32 residual tokens and P8;
  the NLL on CUDA within TOLERANCE of CPU FP32's;
- GPTQ, AWQ (search in the model dtype and in the other half-precision dtype) on CUDA: finite and below RTN's NLL + 1%;
- layer-wise RTN written on CUDA equals the in-memory RTN (NLL within tolerance);
- block-streamed evaluation on CUDA equals the in-memory run (NLL within 1e-3 relative);
- generation with a quantized cache (KV4 post-RoPE) runs and the first token equals recomputation;
- --device_map auto (one GPU) equals --device cuda.
Timings: W4A8KV4 vs FP forward (in memory), streamed vs in-memory on the 7B-shaped checkpoint.

Without CUDA, the CPU fallback runs the same paths on CPU with a tiny model and compares nothing
(it checks that the script itself works); it writes nothing to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SECTION = "## CUDA check (bench/gpu_check.sh)"
TOLERANCE = 0.02
"""Relative NLL difference allowed between a half-precision CUDA run and CPU FP32 (rounding
boundaries of the quantizers move with the compute dtype)."""

SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True)
LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, head_dim=128, vocab_size=32000, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=320, tie_word_embeddings=False)

PLANS = {
    "FP": {},
    "W4 g128": dict(w_bits=4, w_group_size=128),
    "W4A8KV4 Q8 k-scale": dict(w_bits=4, w_group_size=128, a_bits=8, q_bits=8, k_bits=4, v_bits=4,
                               k_group_size=128, v_group_size=128, apply_k_scale=True),
    "KV2 KCVT r32 P8": dict(k_bits=2, v_bits=2, k_group_size=32, v_group_size=64, kv_quant_method="KCVT",
                            kv_residual_len=32, p_bits=8),
}


def write_checkpoint(path: Path, shape: dict, seed: int = 0) -> Path:
    """A Llama checkpoint with random BF16 weights (N(0, 0.02), norms 1), written tensor by tensor."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from wkvaq_quant.weights.safetensors_io import ShardWriter

    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**shape, max_position_embeddings=4096)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    if shape["tie_word_embeddings"]:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(seed)
    with ShardWriter(path / "model.safetensors", [(k, torch.bfloat16, s) for k, s in shapes.items()]) as w:
        for k, s in shapes.items():
            t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02
            w.write(k, t.to(torch.bfloat16))
    cfg.torch_dtype = torch.bfloat16
    cfg.save_pretrained(path)
    return path


class Checks:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def run(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            status, detail = fn()
        except Exception as err:  # a check that breaks is a FAIL with its reason, the others still run
            status, detail = "FAIL", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            traceback.print_exc()
        detail = f"{detail} ({time.perf_counter() - t0:.1f} s)"
        self.rows.append((name, status, detail))
        print(f"[gpu_check] {status:4} {name}: {detail}", flush=True)

    @property
    def failed(self) -> int:
        return sum(s == "FAIL" for _, s, _ in self.rows)


def _close(a: float, b: float, tol: float) -> tuple[str, str]:
    rel = abs(a - b) / abs(b)
    return ("PASS" if math.isfinite(a) and rel <= tol else "FAIL"), f"NLL {a:.2f} vs {b:.2f} (rel {rel:.2e}, tol {tol})"


def main() -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.environ.get("TMPDIR", "/tmp") + "/wkvaq-gpu-check")
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for gpu_check.md / .json")
    p.add_argument("--write", action="store_true", help="update the section in bench/RESULTS.md (CUDA only)")
    p.add_argument("--cpu_fallback", action="store_true", help="run the CPU fallback even where CUDA is available")
    p.add_argument("--skip_7b", action="store_true", help="no 7B-shaped checkpoint (streaming timing skipped)")
    args = p.parse_args()

    from wkvaq_quant.eval.ppl import evaluate_perplexity
    from wkvaq_quant.eval.stream import StreamBatch, stream_perplexity
    from wkvaq_quant.modeling import attach
    from wkvaq_quant.models import ModelSource, load_model
    from wkvaq_quant.plan import QuantPlan
    from wkvaq_quant.weights.algo import WeightAlgo, run_weight_algo
    from wkvaq_quant.weights.awq.settings import AwqSearchConfig
    from wkvaq_quant.weights.layerwise import quantize_layer_wise

    cuda = torch.cuda.is_available() and not args.cpu_fallback
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checks = Checks()
    gen = torch.Generator().manual_seed(0)
    if cuda:
        device, dtypes, seq, n = "cuda", ["float16", "bfloat16"], 512, 4
        from wkvaq_quant.models import cache_dir

        embedded = cache_dir() / "models" / "smollm2-135m"
        small = embedded if (embedded / "model.safetensors").is_file() else write_checkpoint(work / "smol", SMOL)
        import importlib.util

        attns = ["sdpa", "eager"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
        print(f"[gpu_check] {torch.cuda.get_device_name()}, torch {torch.__version__}, model {small}", flush=True)
    else:
        device, dtypes, seq, n = "cpu", ["float32"], 64, 2
        torch.set_num_threads(1)  # many tiny ops: one thread is far faster than two oversubscribed ones
        small, attns = write_checkpoint(work / "tiny", TINY), ["sdpa", "eager"]
        print("[gpu_check] no CUDA here: CPU fallback on a tiny random model (paths run, nothing compared)", flush=True)
    vocab = json.loads((Path(small) / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (n, seq), generator=gen)
    calib = torch.randint(0, vocab, (8, 256 if cuda else 32), generator=gen)
    source = ModelSource("check", "local", str(small), True)

    def nll(dtype: str, dev: str, attn: str, plan: QuantPlan, algo: WeightAlgo | None = None,
            model_dir: Path | None = None, **load) -> float:
        src = source if model_dir is None else ModelSource("q", "local", str(model_dir), True)
        model, _ = load_model(src, dtype, dev, attn, **load)
        if algo is not None:
            plan = run_weight_algo(model, plan, algo, calib, dev, progress=False)
        if not plan.is_full_precision:
            attach(model, plan, keep_originals=False)
        out = evaluate_perplexity(model, ids, 2, progress=False).nll_sum
        del model
        if dev == "cuda":
            torch.cuda.empty_cache()
        return out

    reference: dict[str, float] = {}
    for name, flags in PLANS.items():
        reference[name] = nll("float32", "cpu", "eager", QuantPlan.from_flags(**flags))
    for dtype in dtypes:
        for attn in attns:
            for name, flags in PLANS.items():
                if attn == "flash_attention_2" and (flags.get("p_bits") or flags.get("kv_residual_len")):
                    continue  # P and residual tokens need the eager attention (wkvaq selects it itself)
                plan = QuantPlan.from_flags(**flags)
                checks.run(f"{dtype} {attn} {name}", lambda: (
                    _close(nll(dtype, device, attn, plan), reference[name], TOLERANCE) if cuda else
                    ("PASS", f"NLL {nll(dtype, device, attn, plan):.2f}")))
        w4 = QuantPlan.from_flags(w_bits=4, w_group_size=128 if cuda else 16)
        rtn = nll(dtype, device, "sdpa", w4)
        for algo in (WeightAlgo("gptq"), WeightAlgo("awq", awq=AwqSearchConfig(search_dtype="model")),
                     WeightAlgo("awq", awq=AwqSearchConfig(search_dtype="bfloat16" if dtype != "bfloat16"
                                                           else "float16"))):
            label = algo.name + (f" search {algo.awq.search_dtype}" if algo.name == "awq" else "")

            def calibrated(algo=algo):
                got = nll(dtype, device, "sdpa", w4, algo)
                ok = math.isfinite(got) and (got <= rtn * 1.01 or not cuda)
                return ("PASS" if ok else "FAIL"), f"NLL {got:.2f}, RTN {rtn:.2f}"

            checks.run(f"{dtype} {label} W4", calibrated)

        def layer_wise():
            out = work / f"lw-{dtype}"
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            quantize_layer_wise(small, out, w4, WeightAlgo("rtn"), None, getattr(torch, dtype), device,
                                progress=False, log=lambda m: None)
            return _close(nll(dtype, device, "sdpa", QuantPlan(), model_dir=out), rtn, TOLERANCE)

        checks.run(f"{dtype} layer-wise RTN W4 written on {device}", layer_wise)
        w4a8kv4 = QuantPlan.from_flags(**PLANS["W4A8KV4 Q8 k-scale"]) if cuda else QuantPlan.from_flags(
            w_bits=4, w_group_size=16, a_bits=8, k_bits=4, v_bits=4, k_group_size=16)

        def streamed():
            ref = nll(dtype, device, "sdpa", w4a8kv4)
            batches = [StreamBatch("x", ids[b: b + 2]) for b in range(0, n, 2)]
            got = stream_perplexity(small, w4a8kv4, batches, {"x": n}, getattr(torch, dtype), device,
                                    progress=False, log=lambda m: None)["x"].nll_sum
            return _close(got, ref, 1e-3 if cuda else 0.0)

        checks.run(f"{dtype} streamed W4A8KV4 equals in memory", streamed)

        def generation():
            plan = QuantPlan.from_flags(k_bits=4, v_bits=4, k_group_size=64 if cuda else 16,
                                        v_group_size=64 if cuda else 16, k_quant_post_rope=True, kv_residual_len=0)
            model, _ = load_model(source, dtype, device, "sdpa")
            attach(model, plan, keep_originals=False)
            prompt = ids[:1, :32].to(device)
            out = model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
            first = model(prompt, use_cache=False).logits[0, -1].argmax().item()
            ok = out.shape[1] == 40 and out[0, 32].item() == first
            return ("PASS" if ok else "FAIL"), f"{out.shape[1] - 32} tokens, first {out[0, 32].item()} vs {first}"

        checks.run(f"{dtype} generation with a KV4 cache", generation)
        if cuda:
            checks.run(f"{dtype} --device_map auto equals --device cuda", lambda: _close(
                nll(dtype, "cuda", "sdpa", w4a8kv4, device_map="auto"), nll(dtype, "cuda", "sdpa", w4a8kv4), 1e-6))

    timings = []
    if cuda:
        def forward_s(plan: QuantPlan, dtype: str = "bfloat16") -> float:
            model, _ = load_model(source, dtype, "cuda", "sdpa")
            if not plan.is_full_precision:
                attach(model, plan, keep_originals=False)
            with torch.no_grad():
                model(ids[:1].cuda(), use_cache=False)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(5):
                    model(ids[:1].cuda(), use_cache=False)
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) / 5

        fp_s = forward_s(QuantPlan())
        q_s = forward_s(w4a8kv4)
        timings.append(f"W4A8KV4 Q8 vs FP forward (BF16, 1 x {seq}, in memory): {q_s * 1e3:.1f} ms vs "
                       f"{fp_s * 1e3:.1f} ms = {q_s / fp_s:.2f}x")
        if not args.skip_7b:
            big = write_checkpoint(work / "llama7b", LLAMA7B)
            big_ids = torch.randint(0, LLAMA7B["vocab_size"], (2, 2048), generator=gen)

            def big_run(stream: bool) -> tuple[float, float]:
                t0 = time.perf_counter()
                if stream:
                    got = stream_perplexity(big, QuantPlan(), [StreamBatch("x", big_ids)], {"x": 2}, torch.bfloat16,
                                            "cuda", progress=False, log=lambda m: None)["x"].nll_sum
                else:
                    model, _ = load_model(ModelSource("b", "local", str(big), True), "bfloat16", "cuda", "sdpa")
                    got = evaluate_perplexity(model, big_ids, 2, progress=False).nll_sum
                    del model
                    torch.cuda.empty_cache()
                return time.perf_counter() - t0, got

            mem_s, mem_nll = big_run(False)
            st_s, st_nll = big_run(True)
            timings.append(f"7B-shaped BF16, 2 x 2048, FP: streamed {st_s:.1f} s vs in memory (load included) "
                           f"{mem_s:.1f} s = {st_s / mem_s:.2f}x; NLL {st_nll:.3f} vs {mem_nll:.3f}")
            checks.run("7B-shaped streamed equals in memory", lambda: _close(st_nll, mem_nll, 1e-3))
        for t in timings:
            print(f"[gpu_check] timing: {t}", flush=True)
    lines = [SECTION, "", f"Command: `bash bench/gpu_check.sh`. Device: "
             f"{torch.cuda.get_device_name() if cuda else 'none (CPU fallback)'}, torch {torch.__version__}. "
             f"Tolerance against CPU FP32: {TOLERANCE} relative NLL.", "",
             "| check | result | detail |", "|---|---|---|", *[f"| {a} | {b} | {c} |" for a, b, c in checks.rows]]
    if timings:
        lines += ["", *[f"- {t}" for t in timings]]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.md").write_text(text)
    if args.write and cuda:
        from _results_md import write_section

        write_section(SECTION, text)
    print(f"[gpu_check] {len(checks.rows) - checks.failed} passed, {checks.failed} failed"
          + ("" if cuda else " (CPU fallback: no CUDA)"), flush=True)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
