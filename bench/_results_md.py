"""Shared by the benchmarks: run `main.py` and read its result record; replace one section of
bench/RESULTS.md, leaving the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
ROOT = RESULTS_MD.parents[1]


def run_main(flags: list[str], results_dir: str | Path) -> dict:
    """Run `main.py` with `flags` into `results_dir` (a finished result is reused) and return its
    result record, with the process's wall time added as `bench_wall_s`."""
    from wkvaq_quant.cli import parse_config
    from wkvaq_quant.run import result_status

    argv = [*flags, "--results_dir", str(results_dir), "--no_progress"]
    cmd = [sys.executable, str(ROOT / "main.py"), *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    wall = time.perf_counter() - t0
    path, _ = result_status(parse_config(argv))  # the file main.py wrote (resolved in-process, nothing loaded)
    record = json.loads((ROOT / path).read_text())
    record["bench_wall_s"] = wall
    return record


DTYPE_NAMES = {"float32": "FP32", "bfloat16": "BF16"}
"""Labels of the model dtypes a side-by-side pair with llm-compressor can run in (`--dtype` of both)."""


def dtype_flags(dtype: str) -> list[str]:
    """The `--dtype` flags of our scripts and the peer scripts for a model dtype; none for the
    default float32."""
    return [] if dtype == "float32" else ["--dtype", dtype]


def bf16_note(tokens: int = 2048, k: int = 576, n: int = 1536, reps: int = 10) -> str:
    """A sentence on how much faster this CPU multiplies in bfloat16 than in float32, measured now
    on one single-threaded Linear of the embedded model's MLP shape (best of `reps`)."""
    import torch
    import torch.nn.functional as F

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = {}
    try:
        for dtype in (torch.float32, torch.bfloat16):
            x, w = torch.randn(tokens, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            F.linear(x, w)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                F.linear(x, w)
                times.append(time.perf_counter() - t0)
            best[dtype] = min(times)
    finally:
        torch.set_num_threads(threads)
    ratio = best[torch.float32] / best[torch.bfloat16]
    return (f"On this CPU one thread multiplies in BF16 {ratio:.1f}x as fast as in FP32 (a [{tokens}, {k}] x [{k}, {n}] "
            f"Linear: {best[torch.float32] * 1e3:.1f} vs {best[torch.bfloat16] * 1e3:.1f} ms, measured by the benchmark "
            f"while writing this), so in BF16 the forwards shrink and the rest of each run (quantizing weights, "
            f"FP32 Hessians and the GPTQ column loop, Python overhead) weighs more.")


def write_section(title: str, section: str, path: Path = RESULTS_MD) -> None:
    """Replace the section headed `title` (up to the next '## ') with `section`, or append it."""
    old = path.read_text() if path.exists() else "# Benchmark results\n\n"
    start = old.find(title)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + section
    else:
        end = old.find("\n## ", start + len(title))
        new = old[:start] + section.rstrip("\n") + "\n" + ("" if end < 0 else "\n" + old[end + 1:])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
