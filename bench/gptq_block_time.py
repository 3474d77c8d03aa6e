"""Per-block GPTQ time of the current code against an earlier revision of
wkvaq_quant/weights/gptq.py, interleaved in one process on the embedded model's first blocks
(32 x 512 calibration tokens from wiki_sample, W4 g64), with the resulting weights compared.

    OMP_NUM_THREADS=1 python bench/gptq_block_time.py --rev 5166e6f --write

Prints one JSON line: process CPU seconds per implementation (mean of `--rounds` interleaved rounds),
the ratio new / old, and whether every block's weights are bit-identical.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results_md import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTION = "## GPTQ block time against an earlier revision (bench/gptq_block_time.py)"

from wkvaq_quant.plan import QuantPlan  # noqa: E402
from wkvaq_quant.data import get_calib_windows, resolve_text_source  # noqa: E402
from wkvaq_quant.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from wkvaq_quant.weights import gptq as current  # noqa: E402
from wkvaq_quant.weights.blocks import capture_block_inputs, run_block  # noqa: E402


def _module_at(rev: str, tmp: Path):
    """wkvaq_quant/weights/gptq.py as of git revision `rev`, imported as a separate module."""
    src = subprocess.run(["git", "show", f"{rev}:wkvaq_quant/weights/gptq.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = tmp / "gptq_at_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("gptq_at_rev", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", default="5166e6f", help="git revision of the earlier gptq.py")
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--n_calib", type=int, default=32)
    p.add_argument("--calib_seq_len", type=int, default=512)
    p.add_argument("--write", action="store_true", help="update the section in bench/RESULTS.md")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = _module_at(args.rev, Path(tmp))
    src = resolve_model("smollm2-135m")
    calib = get_calib_windows(resolve_text_source("wiki_sample", "calib"), load_tokenizer(src), args.n_calib,
                              args.calib_seq_len, 0, src.add_special_tokens)
    model, _ = load_model(src)
    inputs = capture_block_inputs(model, calib, "cpu", 1)
    plan = QuantPlan.from_flags(w_bits=4, w_group_size=64)
    cpu = {"old": 0.0, "new": 0.0}
    identical = True
    for b in range(args.blocks):
        block = model.model.layers[b]
        weights = {}
        for _ in range(args.rounds):
            for key, mod in (("old", old), ("new", current)):
                blk = copy.deepcopy(block)
                lins = [(n.rsplit(".", 1)[-1], m) for n, m in blk.named_modules() if isinstance(m, torch.nn.Linear)]
                t0 = time.process_time()
                mod.gptq_block(blk, b, lins, inputs, plan, mod.GptqConfig(), "cpu")
                cpu[key] += (time.process_time() - t0) / args.rounds
                weights[key] = [m.weight.clone() for _, m in lins]
        identical &= all(torch.equal(a, c) for a, c in zip(weights["old"], weights["new"]))
        inputs = inputs.with_hidden(run_block(block, inputs, "cpu"))
    rec = {"rev": args.rev, "blocks": args.blocks, "old_cpu_s": cpu["old"], "new_cpu_s": cpu["new"],
           "ratio": cpu["new"] / cpu["old"], "bit_identical": identical}
    print(json.dumps(rec))
    section = f"""{SECTION}

`gptq_block` (true-sequential Hessian passes and the column loop of the 7 Linears of a block) of the current
code against wkvaq_quant/weights/gptq.py at {args.rev}, on blocks 0-{args.blocks - 1} of the embedded model,
{args.n_calib} x {args.calib_seq_len} calibration tokens, W4 g64 INT, {args.rounds} interleaved rounds in one process,
{torch.get_num_threads()} thread(s), process CPU time: {args.rev} {cpu['old']:.1f} s, current {cpu['new']:.1f} s
(**{rec['ratio']:.2f}x**); weights bit-identical: {'yes' if identical else 'NO'}. The current code stops each
Hessian pass's forward at its group's last Linear and accumulates one Hessian for Linears fed one tensor.

    OMP_NUM_THREADS=1 python bench/gptq_block_time.py --rev {args.rev} --blocks {args.blocks} --write
"""
    if args.write:
        write_section(SECTION, section)


if __name__ == "__main__":
    main()
