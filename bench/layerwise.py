"""Layer-wise quantization memory benchmark: peak RSS of layer-wise RTN versus loading the model
whole and quantizing it, on a synthetic Llama-shaped checkpoint (random weights, written once to
safetensors shards by this script).

    OMP_NUM_THREADS=1 python bench/layerwise.py --write

Each measurement is its own process (its peak RSS is its own): `whole` loads the checkpoint with
`from_pretrained` and runs `rtn_quantize`; `layer-wise` runs `main.py --layer_wise --save_quant`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results_md import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Layer-wise quantization memory (bench/layerwise.py)"

WRITE = """
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(**json.loads(sys.argv[2]))
torch.manual_seed(0)
with torch.device("meta"):
    m = LlamaForCausalLM(cfg)
m.to_empty(device="cpu")
for p in m.parameters():
    p.data.normal_(0, 0.02)
m.to(torch.bfloat16).save_pretrained(sys.argv[1], max_shard_size="500MB")
print(sum(p.numel() for p in m.parameters()))
"""

WHOLE = """
import json, resource, sys, time
t0 = time.perf_counter()
from wkvaq_quant.config import QuantPlan
from wkvaq_quant.models import load_model, resolve_model
from wkvaq_quant.weights.rtn import rtn_quantize
model, _ = load_model(resolve_model(sys.argv[1]), "bfloat16")
rtn_quantize(model, QuantPlan.from_flags(w_bits=4, w_group_size=128))
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--work", default="/tmp/wkvaq-bench-layerwise")
    p.add_argument("--write", action="store_true", help="update the section in bench/RESULTS.md")
    args = p.parse_args()
    work = Path(args.work)
    src, out = work / "synthetic", work / "quant"
    shape = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                 num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 256, head_dim=64,
                 vocab_size=args.vocab, tie_word_embeddings=False)
    if not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        n_params = int(_run([sys.executable, "-c", WRITE, str(src), json.dumps(shape)]).strip().splitlines()[-1])
        (work / "n_params.txt").write_text(str(n_params))
    n_params = int((work / "n_params.txt").read_text())
    size_gb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**30
    whole = json.loads(_run([sys.executable, "-c", WHOLE, str(src)]).strip().splitlines()[-1])
    base = json.loads(_run([sys.executable, "-c", BASELINE]).strip().splitlines()[-1])["peak_rss_mb"]
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    printed = _run([sys.executable, "main.py", "--model", str(src), "--dtype", "bfloat16", "--w_bits", "4",
                    "--w_group_size", "128", "--layer_wise", "--save_quant", str(out), "--no_progress"])
    lw = json.loads(printed[printed.index("{\n"):])
    lw["wall_s"] = time.perf_counter() - t0
    ratio = lw["peak_rss_mb"] / whole["peak_rss_mb"]
    above = (lw["peak_rss_mb"] - base) / (whole["peak_rss_mb"] - base)
    print(json.dumps({"whole": whole, "layer_wise": lw, "baseline_mb": base, "ratio": ratio}, indent=1), flush=True)
    section = f"""{SECTION}

Synthetic Llama-shaped checkpoint, random weights, BF16 safetensors in shards of 500 MB:
{n_params / 1e9:.2f} B parameters ({size_gb:.2f} GiB; hidden {args.hidden}, intermediate {args.intermediate},
{args.layers} blocks, vocabulary {args.vocab}, untied head). W4 g128 INT RTN, CPU:

| run | peak RSS | wall time |
|---|---:|---:|
| whole model (`from_pretrained` + `rtn_quantize`) | {whole['peak_rss_mb'] / 1024:.2f} GiB | {whole['seconds']:.0f} s |
| layer-wise (`main.py --layer_wise --save_quant`) | {lw['peak_rss_mb'] / 1024:.2f} GiB | {lw['wall_s']:.0f} s |

Layer-wise peak RSS is {ratio:.1%} of the whole-model run's ({1 - ratio:.1%} less; the goal of 90% less is not
reached at this size). A process that only imports torch, transformers and this package peaks at
{base / 1024:.2f} GiB; above that, layer-wise needs {above:.1%} of the whole-model run ({1 - above:.1%} less): the
embeddings and head (2 x {args.vocab} x {args.hidden}), one block and its quantization temporaries.
GPTQ layer-wise was not measured at this size (its column loop on this 2-core CPU would take long).

    OMP_NUM_THREADS=1 python bench/layerwise.py --write
"""
    print(section)
    if args.write:
        write_section(SECTION, section)


if __name__ == "__main__":
    main()
