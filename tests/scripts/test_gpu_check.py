"""bench/gpu_check.sh without CUDA: its CPU fallback runs every path on a tiny model, passes, says
it compared nothing, and leaves bench/RESULTS.md alone (the CUDA run itself needs a GPU)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the real check")
def test_gpu_check_cpu_fallback(tmp_path):
    results = (ROOT / "bench" / "RESULTS.md").read_bytes()
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--work", str(tmp_path / "w"), "--out",
                           str(tmp_path / "out"), "--write"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CPU fallback" in proc.stdout and "0 failed" in proc.stdout
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    for path in ("sdpa W4A8KV4", "eager KV2 KCVT r32 P8", "gptq W4", "awq search model", "awq search bfloat16",
                 "layer-wise RTN", "streamed W4A8KV4 equals in memory", "generation with a KV4 cache"):
        assert path in report, path
    assert "FAIL" not in report
    assert (ROOT / "bench" / "RESULTS.md").read_bytes() == results  # --write does nothing without CUDA
