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
