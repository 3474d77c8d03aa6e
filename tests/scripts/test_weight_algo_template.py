"""The weight-algorithm sweep template on a tiny model: RTN / GPTQ / AWQ in memory, and layer-wise
checkpoints that are written, evaluated, skipped once complete, with a failing setting logged."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.scripts.test_sweep import summary

ROOT = Path(__file__).resolve().parents[2]


def _template(model, tmp_path, cache, **env):
    full_env = {**os.environ, "PYTHON": sys.executable, "WKVAQ_CACHE": str(cache), "MODEL_LIST": str(model),
                "RESULTS_DIR": str(tmp_path / "results"), "SAVE_DIR": str(tmp_path / "quantized"), "SEQ_LEN": "64",
                "N_WINDOWS": "1", "W_GROUP_SIZE_LIST": "16", "N_CALIB": "2", "CALIB_SEQ_LEN": "32", "N_GRID": "3",
                "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run(["bash", "scripts/test_ppl_weight_algo_template.sh"], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


def _records(results: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in results.rglob("*.json")}


def test_in_memory_sweep_runs_each_algorithm(tmp_path, tiny_llama, isolated_cache):
    code, out = _template(tiny_llama, tmp_path, isolated_cache, WEIGHT_ALGO_LIST="rtn awq")
    assert code == 0, out
    assert summary(out) == {("done", f"W4g16-{a}") for a in ("rtn", "awq")}
    algos = sorted(r["config"]["weight_algo"]["name"] for r in _records(tmp_path / "results").values())
    assert algos == ["awq", "rtn"]


def test_layer_wise_sweep_writes_evaluates_skips_and_survives_a_failure(tmp_path, tiny_llama, isolated_cache):
    env = {"LAYER_WISE": "1", "WEIGHT_ALGO_LIST": "bogus gptq", "OFFLOAD_ACTIVATIONS": "1"}
    code, out = _template(tiny_llama, tmp_path, isolated_cache, **env)
    assert code == 1, out  # the bogus algorithm failed, the sweep went on
    name = Path(tiny_llama).name
    assert summary(out) == {("failed", f"{name} W4g16-bogus"), ("done", f"{name} W4g16-gptq"),
                            ("done", f"{name}-w4-g16-gptq")}
    assert "invalid choice: 'bogus'" in out
    state = json.loads((tmp_path / "quantized" / f"{name}-w4-g16-gptq" / "wkvaq_layerwise.json").read_text())
    assert state["complete"] and state["settings"]["weight_algo"]["name"] == "gptq"
    (record,) = _records(tmp_path / "results").values()
    assert record["config"]["model"] == str(tmp_path / "quantized" / f"{name}-w4-g16-gptq")
    code, out = _template(tiny_llama, tmp_path, isolated_cache, **env)
    assert code == 1, out
    assert summary(out) == {("failed", f"{name} W4g16-bogus"), ("skipped", f"{name} W4g16-gptq"),
                            ("skipped", f"{name}-w4-g16-gptq")}
    # a complete checkpoint with a damaged shard is not skipped: main.py verifies it and redoes the block
    ckpt = tmp_path / "quantized" / f"{name}-w4-g16-gptq"
    shard = ckpt / state["shards"]["0"]
    good = shard.read_bytes()
    shard.write_bytes(good[:-5])
    code, out = _template(tiny_llama, tmp_path, isolated_cache, **env)
    assert code == 1, out
    assert summary(out) == {("failed", f"{name} W4g16-bogus"), ("done", f"{name} W4g16-gptq"),
                            ("skipped", f"{name}-w4-g16-gptq")}
    assert shard.read_bytes() == good
    log = (tmp_path / "results" / "logs" / f"quantize_{name}_W4g16-gptq.log").read_text()
    assert f"{shard}: damaged shard of block 0" in log
