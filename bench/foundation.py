"""Foundation benchmark: embedded-model load time (cold GGUF conversion vs warm cache),
FP perplexity on wiki_sample, tokens per second and peak RSS.

    python bench/foundation.py --n_windows 289        # all windows at seq_len 2048
    python bench/foundation.py --n_windows 16 --write  # a subset, and update bench/RESULTS.md

Each measurement runs in its own process so load times and peak RSS are not mixed up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results_md import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Foundation (bench/foundation.py)"

_LOAD = textwrap.dedent("""
    import json, resource, time
    t0 = time.perf_counter()
    from wkvaq_quant.models import ensure_embedded_model, load_model, resolve_model
    t1 = time.perf_counter()
    ensure_embedded_model(verbose=False)
    t2 = time.perf_counter()
    model, load_s = load_model(resolve_model("smollm2-135m"))
    print(json.dumps({"import_s": t1 - t0, "convert_s": t2 - t1, "load_s": load_s,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def _load(cache: str) -> dict:
    env = {**os.environ, "WKVAQ_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _LOAD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_windows", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--write", action="store_true", help="update the section in bench/RESULTS.md")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as cold_cache:
        cold = _load(cold_cache)  # converts the GGUF into an empty cache
        warm = _load(cold_cache)  # the same cache, now filled
    results_dir = tempfile.mkdtemp(prefix="wkvaq-bench-")
    cmd = [sys.executable, str(ROOT / "main.py"), "--model", "smollm2-135m", "--datasets", "wiki_sample",
           "--seq_len", str(args.seq_len), "--n_windows", str(args.n_windows), "--results_dir", results_dir,
           "--no_progress"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    record = json.loads(next(Path(results_dir).rglob("*.json")).read_text())
    r = record["results"]["wiki_sample"]

    import torch

    lines = [
        SECTION,
        "",
        f"Command: `python bench/foundation.py --n_windows {args.n_windows} --seq_len {args.seq_len} --write`",
        f"(machine: {record['device']}, {torch.get_num_threads()} threads, torch {record['versions']['torch']}, "
        f"transformers {record['versions']['transformers']}).",
        "",
        "| measurement | value |",
        "|---|---:|",
        f"| FP32 perplexity, wiki_sample, {r['windows']} of {r['available_windows']} windows x {r['seq_len']} | "
        f"{r['ppl']:.4f} |",
        f"| tokens per second (forward, batch 1) | {r['tokens_per_second']:.0f} |",
        f"| evaluation wall time | {r['seconds']:.1f} s |",
        f"| model load, cold (GGUF -> safetensors conversion + load) | {cold['convert_s'] + cold['load_s']:.1f} s |",
        f"| model load, warm (from the cache) | {warm['load_s']:.2f} s |",
        f"| peak RSS, cold conversion process | {cold['peak_rss_mb']:.0f} MiB |",
        f"| peak RSS, warm load process | {warm['peak_rss_mb']:.0f} MiB |",
        f"| peak RSS, perplexity run (main.py) | {record['peak_rss_mb']:.0f} MiB |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
