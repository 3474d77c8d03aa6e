"""Shared by the llm-compressor benchmarks (run in the separate llm-compressor virtualenv, never a
dependency of the project): the embedded model, the same calibration and evaluation windows as our
runs, an explicit compressed-tensors weight scheme, a check that the model really computes with
fake-quantized weights after `oneshot`, and the JSON record."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wkvaq_quant.data import get_calib_windows, get_eval_windows, resolve_text_source  # noqa: E402
from wkvaq_quant.eval.ppl import evaluate_perplexity  # noqa: E402
from wkvaq_quant.models import load_model, load_tokenizer, resolve_model  # noqa: E402

__all__ = ["MODEL", "check_fake_quantized", "int_scheme", "run_oneshot"]

MODEL = "smollm2-135m"


def int_scheme(bits: int, group_size: int, actorder: str | None = None):
    """compressed-tensors QuantizationScheme: weight-only asymmetric INT, `bits`, groups of
    `group_size` along the input dimension, integer zero point (the W4A16_ASYM preset, spelled out
    so that W3 and other group sizes use the same settings)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", strategy="group", group_size=group_size, symmetric=False, dynamic=False,
        actorder=actorder))


def _manual_dequant(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent QDQ of w [out, in] with per-group scale / zero point [out, in / g] on the
    signed range [-2^(b-1), 2^(b-1) - 1] that compressed-tensors uses for INT."""
    g = w.shape[1] // scale.shape[1]
    s = scale.float().repeat_interleave(g, dim=1)
    z = zp.float().repeat_interleave(g, dim=1)
    q = torch.clamp(torch.round(w.float() / s) + z, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q - z) * s


@torch.no_grad()
def check_fake_quantized(model: nn.Module, bits: int) -> dict[str, Any]:
    """Prove that `model` computes with fake-quantized weights: for the first decoder Linear, its
    forward equals F.linear with an independent dequantization of its stored scale / zero point,
    which differs from the plain weight (unless the weight already sits on that grid). Raises if not."""
    name, lin = next((n, m) for n, m in model.named_modules()
                     if isinstance(m, nn.Linear) and hasattr(m, "weight_scale") and "layers.0." in n)
    deq = _manual_dequant(lin.weight, lin.weight_scale, lin.weight_zero_point, bits)
    dtype = lin.weight.dtype
    x = torch.randn(4, lin.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = lin(x).float()
    err_deq = (y - nn.functional.linear(x, deq.to(dtype), lin.bias).float()).abs().max().item()
    err_plain = (y - nn.functional.linear(x, lin.weight, lin.bias).float()).abs().max().item()
    scale_ref = max(y.abs().max().item(), 1e-12)
    if err_deq > max(1e-4, 4 * torch.finfo(dtype).eps) * scale_ref:  # the model dtype's rounding at most
        raise RuntimeError(f"{name}: forward differs from the manual dequantization by {err_deq:.3g}: "
                           f"the model does not compute with the quantized weights")
    return {"module": name, "max_abs_err_vs_manual_qdq": err_deq, "max_abs_diff_vs_stored_weight": err_plain,
            "stored_weight_on_grid": bool(
                (lin.weight.float() - deq).abs().max().item() < 1e-6)}


def _cpu_only_workarounds() -> list[str]:
    """llm-compressor 0.14 pins cached AWQ activations (`IntermediatesCache.pin_memory`) to speed up
    host-to-accelerator copies; without an accelerator `Tensor.pin_memory()` raises. Pinning changes
    no value, so on a CPU-only machine it is skipped. Returns what was patched."""
    if torch.accelerator.is_available():
        return []
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    return ["IntermediatesCache.pin_memory: no-op (CPU only)"]


def run_oneshot(recipe, n_calib: int, calib_seq_len: int, n_windows: int, bits: int,
                dtype: str = "float32") -> dict:
    """Load the embedded model, run llm-compressor's `oneshot` with `recipe` on our calibration
    windows (wiki_sample calibration split, seed 0), check the fake quantization, evaluate the
    perplexity on our first `n_windows` evaluation windows; return the record. `dtype` is the model's
    dtype throughout (calibration, search and evaluation), as `--dtype` of our runs."""
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot

    source = resolve_model(MODEL)
    tok = load_tokenizer(source)
    calib = get_calib_windows(resolve_text_source("wiki_sample", "calib"), tok, n_calib, calib_seq_len, 0,
                              source.add_special_tokens)
    windows = get_eval_windows(resolve_text_source("wiki_sample", "eval"), tok, 2048,
                               source.add_special_tokens)[:n_windows]
    model, _ = load_model(source, dtype)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    patched = _cpu_only_workarounds()
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=calib_seq_len,
            num_calibration_samples=n_calib, shuffle_calibration_samples=False)
    oneshot_s = time.perf_counter() - t0
    rss_oneshot = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model.eval()
    check = check_fake_quantized(model, bits)
    with torch.no_grad():
        ppl = evaluate_perplexity(model, windows, progress=False).ppl
    import compressed_tensors
    record = {"ppl": ppl, "oneshot_s": oneshot_s, "peak_rss_mb_oneshot": rss_oneshot,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "dtype": dtype, "n_calib": n_calib, "calib_seq_len": calib_seq_len, "n_windows": n_windows,
              "llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
              "threads": torch.get_num_threads(), "fake_quant_check": check,
              "recipe": [repr(m) for m in recipe], "patched": patched}
    return record
