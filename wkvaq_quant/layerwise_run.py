"""`main.py --layer_wise --save_quant DIR`: write a fake-quantized checkpoint block by block
(see weights/layerwise.py) and stop; evaluate it afterwards with `main.py --model DIR`."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

from wkvaq_quant.data import get_calib_windows, resolve_text_source
from wkvaq_quant.models import DTYPES, _pretrained_path, load_tokenizer
from wkvaq_quant.run import RunConfig, prepare_model
from wkvaq_quant.weights.layerwise import quantize_layer_wise
from wkvaq_quant.weights.registry import without_inputs, without_weights

__all__ = ["check_layer_wise", "run_layer_wise"]


def check_layer_wise(cfg: RunConfig) -> None:
    """Refuse settings a layer-wise run cannot honour (before anything is loaded)."""
    if not cfg.save_quant:
        raise ValueError("--layer_wise needs --save_quant DIR (the checkpoint it writes)")
    rest = without_weights(cfg.plan)
    if cfg.weight_algo.spec.uses_input_settings(cfg.weight_algo):  # e.g. AWQ searching with quantized inputs
        rest = without_inputs(rest)
    if not rest.is_full_precision:
        raise ValueError("--layer_wise writes quantized weights only; activation / KV flags (--a_bits, --q_bits, "
                         "--k_bits, --v_bits, --p_bits, KV options) apply when evaluating the written checkpoint: "
                         "python main.py --model DIR ...; allowed: weight flags only (activation flags too with "
                         "--weight_algo awq, whose search sees the inputs quantized)")


def run_layer_wise(cfg: RunConfig, log=print) -> dict[str, Any]:
    """Quantize `cfg.model` layer-wise into `cfg.save_quant`; returns a summary."""
    check_layer_wise(cfg)
    started = time.perf_counter()
    source, _ = prepare_model(cfg.model, cfg.device, cfg.plan, cfg.trust_remote_code, f"--config {cfg.config_file}")
    if source.kind == "hub":
        raise ValueError(f"--layer_wise --model {cfg.model}: needs a local checkpoint directory (or a registry "
                         f"model); download the hub model first")
    algo = cfg.weight_algo
    calib = None
    if algo.needs_calib:
        calib_source = resolve_text_source(algo.calib.dataset, "calib", cfg.data_dir)
        calib = get_calib_windows(calib_source, load_tokenizer(source, cfg.trust_remote_code), algo.calib.n_samples,
                                  algo.calib.seq_len, algo.calib.seed, source.add_special_tokens)
    state = quantize_layer_wise(_pretrained_path(source), Path(cfg.save_quant), cfg.plan, algo, calib,
                                DTYPES[cfg.dtype], cfg.device, model_id=source.name,
                                trust_remote_code=cfg.trust_remote_code, progress=cfg.progress,
                                offload_activations=cfg.offload_activations, log=log)
    return {"save_quant": str(cfg.save_quant), "blocks": len(state["done"]), "complete": state["complete"],
            "weight_algo": algo.to_dict(), "seconds": time.perf_counter() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
