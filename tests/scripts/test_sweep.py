"""The perplexity sweep template on a tiny model: results written, finished settings skipped,
failures logged without stopping the sweep, every outcome in the summary."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def sweep(model, results, cache, **env):
    full_env = {**os.environ, "PYTHON": sys.executable, "WKVAQ_CACHE": str(cache), "MODEL_LIST": str(model),
                "RESULTS_DIR": str(results), "SEQ_LEN": "64", "N_WINDOWS": "1", "SWEEP_PARTS": "fp kv",
                "APPLY_K_SCALE": "off", "K_GROUP_SIZE_LIST": "16", "V_GROUP_SIZE_LIST": "16", "V_BITS_LIST": "4",
                "KV_RESIDUAL_LEN_LIST": "3", **env}
    # KCVT with a residual of 3 tokens and key groups of 16 tokens is refused by main.py: the failing setting
    proc = subprocess.run(["bash", "scripts/test_ppl_template.sh"], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


def summary(out):
    """{(outcome, setting)} from the summary table."""
    part = out.split("=== sweep summary", 1)[1]
    return {(m[0], m[1].split(" ", 1)[1]) for m in re.findall(r"^\| (done|skipped|failed) \| ([^|]+?) \|", part, re.M)}


def test_sweep_runs_skips_and_survives_failures(tmp_path, tiny_llama, isolated_cache):
    results = tmp_path / "results"
    code, out = sweep(tiny_llama, results, isolated_cache, KV_QUANT_METHOD_LIST="KCVT KTVT", K_BITS_LIST="4")
    assert code == 1, out  # a setting failed
    files = sorted(p.name for p in results.rglob("*.json"))
    assert len(files) == 2 and files[0].startswith("fp-") and files[1].startswith("k4g16v4g16-KTVT-r3-"), out
    assert summary(out) == {("done", "FP"), ("failed", "K4g16V4g16-KCVT-r3"), ("done", "K4g16V4g16-KTVT-r3")}
    assert "must be a multiple of --k_group_size 16" in out  # the reason is shown and logged
    assert "must be a multiple" in (results / "logs" / f"{str(tiny_llama).replace('/', '_')}_K4g16V4g16-KCVT-r3.log"
                                    ).read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in results.rglob("*.json")}
    # the report table closes the summary: FP and the KV setting with its delta
    assert re.search(r"^\| \S+ \| fp \| float32 seq64 nw1 \| [\d.]+ \|  \|$", out, re.M)
    assert re.search(r"^\| \S+ \| k4g16v4g16-KTVT-r3 \| float32 seq64 nw1 \| [\d.]+ \| [+-][\d.]+ \|$", out, re.M)

    # rerun with one more K width: both finished settings are skipped, the failure is logged again and
    # the sweep still runs the new setting after it
    code, out = sweep(tiny_llama, results, isolated_cache, KV_QUANT_METHOD_LIST="KCVT KTVT", K_BITS_LIST="4 2")
    assert code == 1, out
    assert summary(out) == {("skipped", "FP"), ("failed", "K4g16V4g16-KCVT-r3"), ("failed", "K2g16V4g16-KCVT-r3"),
                            ("skipped", "K4g16V4g16-KTVT-r3"), ("done", "K2g16V4g16-KTVT-r3")}
    assert "done: 1, skipped (already finished): 2, failed: 2" in out
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # finished files untouched
    assert len(list(results.rglob("*.json"))) == 3
