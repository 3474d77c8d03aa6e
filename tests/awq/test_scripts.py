"""The bash templates: loop, skip finished work, keep going past a failure, summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "awq" / script)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)


def test_templates_loop_skip_and_survive_a_failure(tiny_llama, tmp_path, isolated_cache):
    env = {"MODELS": f"{tmp_path / 'no-such-model'} {tiny_llama}", "W_BITS": "4", "GROUP_SIZES": "32",
           "N_CALIB": "2", "N_GRID": "2", "CALIB_SEQ_LEN": "32", "CACHE_DIR": str(tmp_path / "cache"),
           "SAVE_DIR": str(tmp_path / "models"), "LOG_DIR": str(tmp_path / "logs"), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "WKVAQ_CACHE": str(isolated_cache)}
    tag = f"{tiny_llama.name}-w4-g32"
    first = _run("run_awq.sh", env)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "[fail] no-such-model-w4-g32" in first.stdout
    assert "1 done, 0 skipped, 1 failed" in first.stdout
    assert (tmp_path / "cache" / f"{tag}.pt").is_file()
    assert "--model" in (tmp_path / "logs" / "no-such-model-w4-g32.log").read_text()
    again = _run("run_awq.sh", env)
    assert "0 done, 1 skipped, 1 failed" in again.stdout
    save = _run("run_awq_save_4b_model.sh", env)
    assert "1 done, 0 skipped, 1 failed" in save.stdout, save.stdout + save.stderr
    assert (tmp_path / "models" / tag / "config.json").is_file()
