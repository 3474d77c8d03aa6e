"""llm-compressor's AWQ on the same model, data and settings as bench/awq.py's comparison row:
asymmetric INT weights with an integer zero point, groups of `--group_size` (64 by default: the
embedded model's hidden size 576 is not a multiple of 128, and compressed-tensors refuses group
quantization of such layers), our calibration windows (wiki_sample calibration split, seed 0) and
evaluation windows. The AWQ search is set as close to ours as llm-compressor allows: scales from
the activation magnitude only (`duo_scaling=False`, as llm-awq and ours), `--n_grid` grid points.
llm-compressor's AWQ has no clip search (ours and llm-awq search a clip per group after scaling).

Benchmark only, in a separate virtualenv (llm-compressor is never a dependency of the project);
it was installed with

    python -m venv --system-site-packages /work/venvs/llmcompressor
    /work/venvs/llmcompressor/bin/pip install --no-deps -c constraints.txt llmcompressor==0.14.0.1 \\
        compressed-tensors==0.19.0 transformers==5.17.0 auto-round==0.15.1 nvidia-ml-py loguru
    OMP_NUM_THREADS=1 /work/venvs/llmcompressor/bin/python bench/awq_llmcompressor.py --out peer-awq.json

Prints (and writes to `--out`) one JSON record: perplexity, oneshot wall time, peak RSS, versions,
and a check that the evaluated model computes with the fake-quantized weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _llmcompressor import int_scheme, run_oneshot  # noqa: E402

from wkvaq_quant.results import atomic_write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_windows", type=int, default=8)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group_size", type=int, default=64)
    p.add_argument("--n_calib", type=int, default=8)
    p.add_argument("--calib_seq_len", type=int, default=256)
    p.add_argument("--n_grid", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="model dtype for calibration, search and evaluation (as our --dtype)")
    p.add_argument("--out", default=None, help="write the JSON record here too")
    args = p.parse_args()
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    recipe = [AWQModifier(duo_scaling=False, n_grid=args.n_grid),
              QuantizationModifier(config_groups={"group_0": int_scheme(args.bits, args.group_size)},
                                   ignore=["lm_head"])]
    rec = run_oneshot(recipe, args.n_calib, args.calib_seq_len, args.n_windows, args.bits,
                      args.dtype)
    rec.update(bits=args.bits, group_size=args.group_size, n_grid=args.n_grid, duo_scaling=False)
    print(json.dumps(rec))
    if args.out:
        atomic_write_json(args.out, rec)


if __name__ == "__main__":
    main()
