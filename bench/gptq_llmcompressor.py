"""llm-compressor's GPTQ on the same model, data and settings as bench/gptq.py's comparison rows:
asymmetric INT weights with an integer zero point (W4, or W3 through a custom QuantizationScheme),
groups of `--group_size` (64 by default: the embedded model's hidden size 576 is not a multiple of
128, and compressed-tensors refuses group quantization of such layers), dampening 0.01, blocks of
128 columns, our calibration windows (wiki_sample calibration split, seed 0) and evaluation windows.

`--actorder none` is plain GPTQ (our default). `--actorder static` (= "weight") quantizes the
columns in order of decreasing diag(H) while each column keeps its own group's parameters, which
is our `--act_order --static_groups`. llm-compressor 0.14 has no dynamic ("group") ordering for
GPTQ any more. In llm-compressor every group's scale / zero point comes from the original weight
before GPTQ starts (static groups always); our default chooses them from the error-updated columns
when the group starts, as the reference GPTQ does.

Benchmark only, in a separate virtualenv (llm-compressor is never a dependency of the project);
installed as in bench/awq_llmcompressor.py, then

    OMP_NUM_THREADS=1 /work/venvs/llmcompressor/bin/python bench/gptq_llmcompressor.py --bits 4 \\
        --actorder none --out peer-gptq-w4.json

Prints (and writes to `--out`) one JSON record: perplexity, oneshot (GPTQ) wall time, peak RSS,
versions, and a check that the evaluated model computes with the fake-quantized weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _llmcompressor import int_scheme, run_oneshot  # noqa: E402

from wkvaq_quant.results import atomic_write_json  # noqa: E402

ACTORDER = {"none": None, "static": "static"}


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_windows", type=int, default=8)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group_size", type=int, default=64)
    p.add_argument("--actorder", choices=sorted(ACTORDER), default="none")
    p.add_argument("--n_calib", type=int, default=32)
    p.add_argument("--calib_seq_len", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="model dtype for calibration, search and evaluation (as our --dtype)")
    p.add_argument("--out", default=None, help="write the JSON record here too")
    args = p.parse_args()
    from llmcompressor.modifiers.gptq import GPTQModifier

    actorder = ACTORDER[args.actorder]
    recipe = [GPTQModifier(config_groups={"group_0": int_scheme(args.bits, args.group_size, actorder)},
                           ignore=["lm_head"], block_size=128, dampening_frac=0.01, actorder=actorder)]
    rec = run_oneshot(recipe, args.n_calib, args.calib_seq_len, args.n_windows, args.bits,
                      args.dtype)
    rec.update(bits=args.bits, group_size=args.group_size, actorder=args.actorder, block_size=128,
               dampening_frac=0.01)
    print(json.dumps(rec))
    if args.out:
        atomic_write_json(args.out, rec)


if __name__ == "__main__":
    main()
