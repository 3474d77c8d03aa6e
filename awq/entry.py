"""AWQ command line: search, save, apply, write a fake-quantized checkpoint.

    python -m awq.entry --model smollm2-135m --w_bit 4 --q_group_size 128 --wq_dtype bitmod \\
        --run_awq --dump_awq awq_cache/smollm2-135m-w4-g128-bitmod.pt
    python -m awq.entry --model smollm2-135m --w_bit 4 --q_group_size 128 --wq_dtype bitmod \\
        --load_awq awq_cache/smollm2-135m-w4-g128-bitmod.pt --dump_fake quant_models/smollm2-135m-w4-g128-bitmod
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from wkvaq_quant.weights.awq.cache import check_cache, check_cache_model, load_cache, save_cache
from wkvaq_quant.weights.awq.config import FLAGS as AWQ_FLAGS, AwqConfig
from wkvaq_quant.weights.awq.pre_quant import apply_awq, run_awq
from wkvaq_quant.cli import add_calib_args, explicit_flags
from wkvaq_quant.config import W_DTYPES
from wkvaq_quant.data import get_calib_windows, resolve_text_source
from wkvaq_quant.models import DTYPES, EMBEDDED_MODEL, load_model, load_tokenizer
from wkvaq_quant.results import atomic_write_json
from wkvaq_quant.userfiles import run_cli
from wkvaq_quant.run import DEVICES, prepare_model
from wkvaq_quant.weights.awq.settings import AWQ_SEARCH_DTYPES, SEARCH_DTYPE_HELP
from wkvaq_quant.weights.rtn import rtn_quantize

__all__ = ["build_parser", "main", "parse_config", "run"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m awq.entry", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_MODEL, help="registry short name, local directory or hub id")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where each decoder block is processed")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--w_bit", type=int, default=4, help="weight bits")
    p.add_argument("--q_group_size", type=int, default=128, help="input channels per group (-1 = whole row)")
    p.add_argument("--wq_dtype", default="int", choices=W_DTYPES, help="weight format")
    p.add_argument("--use_double_quant", action="store_true", help="group scales as UINT8 per output row")
    p.add_argument("--run_awq", action="store_true", help="search scales and clips on calibration data")
    p.add_argument("--dump_awq", default=None, help="save the search result (.pt) here")
    p.add_argument("--load_awq", default=None, help="apply a saved search result")
    p.add_argument("--dump_fake", default=None, help="write the fake-quantized model as an HF checkpoint here")
    p.add_argument("--n_grid", type=int, default=20, help="grid points of the scale and clip searches")
    p.add_argument("--search_dtype", default="model", choices=list(AWQ_SEARCH_DTYPES),
                   help=SEARCH_DTYPE_HELP)
    p.add_argument("--batch_size", type=int, default=1, help="calibration windows per block forward")
    p.add_argument("--data_dir", default=None, help="local copies of wikitext2 / c4 (or $WKVAQ_DATA_DIR)")
    p.add_argument("--config", default=None,
                   help="llmc-style YAML (quant: method Awq, weight, mix_bits): per-layer weight settings")
    p.add_argument("--no_progress", action="store_true")
    add_calib_args(p)
    return p


_MAIN_NAMES = {"w_bit": "w_bits", "q_group_size": "w_group_size", "wq_dtype": "w_dtype"}
"""This entry's weight flags -> main.py's names (used by the YAML's contradiction check)."""


def parse_config(argv: list[str] | None = None) -> AwqConfig:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return AwqConfig(
            model=a.model, w_bit=a.w_bit, q_group_size=a.q_group_size, wq_dtype=a.wq_dtype,
            double_quant=a.use_double_quant, run_awq=a.run_awq, load_awq=a.load_awq, dump_awq=a.dump_awq,
            dump_fake=a.dump_fake, device=a.device, dtype=a.dtype, calib_dataset=a.calib_dataset, n_calib=a.n_calib,
            calib_seq_len=a.calib_seq_len, seed=a.seed, data_dir=a.data_dir, n_grid=a.n_grid,
            search_dtype=a.search_dtype, batch_size=a.batch_size, trust_remote_code=a.trust_remote_code,
            progress=not a.no_progress,
            config=a.config, explicit=tuple((_MAIN_NAMES[k], v) for k, v in explicit_flags(build_parser(), argv).items()
                                            if k in _MAIN_NAMES))
    except ValueError as err:
        parser.error(str(err))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dump_fake(model, tokenizer, cfg: AwqConfig, info: dict) -> None:
    """save_pretrained into a temporary sibling directory, then rename it into place."""
    final = Path(cfg.dump_fake)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "wkvaq_awq.json", info)
        if final.exists():
            final.rmdir()  # empty (checked in AwqConfig)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(cfg: AwqConfig, log=print) -> dict:
    """Search and/or apply AWQ per `cfg`; returns a summary (times, peak RSS, paths)."""
    started = time.perf_counter()
    plan = cfg.plan()
    source, _ = prepare_model(cfg.model, cfg.device, plan, cfg.trust_remote_code, f"--config {cfg.config}",
                              flags=AWQ_FLAGS)
    cache = load_cache(cfg.load_awq) if cfg.load_awq else None
    if cache is not None:
        check_cache_model(cache, source.name, cfg.load_awq)
    calib_source = resolve_text_source(cfg.calib_dataset, "calib", cfg.data_dir) if cfg.run_awq else None
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    calib = None
    if calib_source is not None:
        calib = get_calib_windows(calib_source, tokenizer, cfg.n_calib, cfg.calib_seq_len, cfg.seed,
                                  source.add_special_tokens)
    # blocks go to cfg.device one at a time; the model itself stays on the CPU
    model, load_s = load_model(source, cfg.dtype, "cpu", "sdpa", cfg.trust_remote_code)
    log(f"[awq] loaded {source.path} in {load_s:.1f}s; weights {plan.slug()}")
    summary: dict = {"model": source.name, "format": plan.w.to_dict(), "load_s": load_s}
    if cfg.run_awq:
        t0 = time.perf_counter()
        cache = run_awq(model, plan, calib, source.name, cfg.device, n_grid=cfg.n_grid, batch_size=cfg.batch_size,
                        progress=cfg.progress, search_dtype=cfg.search_dtype)
        cache["meta"]["search"].update(calib_dataset=cfg.calib_dataset, seed=cfg.seed)
        summary["search_s"] = time.perf_counter() - t0
        log(f"[awq] search took {summary['search_s']:.1f}s")
        if cfg.dump_awq:
            save_cache(cache, cfg.dump_awq)
            log(f"[awq] wrote {cfg.dump_awq}")
    elif cache is not None:
        check_cache(cache, model, source.name, plan, cfg.load_awq)
        apply_awq(model, cache)
        log(f"[awq] applied {cfg.load_awq}")
    if cfg.dump_fake:
        rtn_quantize(model, plan, cfg.device if cfg.device != "cpu" else None)
        info = {"model": source.name, "weights": plan.w.to_dict(), "awq_cache": cfg.load_awq or cfg.dump_awq,
                "algorithm": "awq" if cache is not None else "rtn"}
        _dump_fake(model, tokenizer, cfg, info)
        log(f"[awq] wrote the fake-quantized checkpoint {cfg.dump_fake}")
    summary.update(total_s=time.perf_counter() - started, peak_rss_mb=_peak_rss_mb())
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)

    def body() -> int:
        print(json.dumps(run(cfg), indent=1, default=str))
        return 0

    return run_cli(body, argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
