"""llm-compressor's AWQ on the same model, data and settings as bench/awq.py (W4 g128 asymmetric
INT, the same calibration windows, perplexity on the same evaluation windows). Benchmark only:
run it with a separate virtualenv that has llm-compressor (never a dependency of the project):

    python -m venv --system-site-packages /work/venvs/llmcompressor
    /work/venvs/llmcompressor/bin/pip install llmcompressor -c constraints.txt
    OMP_NUM_THREADS=1 /work/venvs/llmcompressor/bin/python bench/awq_llmcompressor.py

Prints one JSON line: perplexity, AWQ wall time, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wkvaq_quant.data import get_calib_windows, get_eval_windows, resolve_text_source  # noqa: E402
from wkvaq_quant.eval.ppl import evaluate_perplexity  # noqa: E402
from wkvaq_quant.models import load_model, load_tokenizer, resolve_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_windows", type=int, default=8)
    p.add_argument("--n_calib", type=int, default=8)
    p.add_argument("--calib_seq_len", type=int, default=256)
    args = p.parse_args()
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier

    source = resolve_model("smollm2-135m")
    tok = load_tokenizer(source)
    calib = get_calib_windows(resolve_text_source("wiki_sample", "calib"), tok, args.n_calib, args.calib_seq_len, 0,
                              source.add_special_tokens)
    windows = get_eval_windows(resolve_text_source("wiki_sample", "eval"), tok, 2048,
                               source.add_special_tokens)[: args.n_windows]
    model, _ = load_model(source)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=[AWQModifier(ignore=["lm_head"], scheme="W4A16_ASYM", targets=["Linear"])],
            max_seq_length=args.calib_seq_len, num_calibration_samples=args.n_calib)
    awq_s = time.perf_counter() - t0
    with torch.no_grad():
        ppl = evaluate_perplexity(model, windows, progress=False).ppl
    print(json.dumps({"ppl": ppl, "awq_s": awq_s,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
