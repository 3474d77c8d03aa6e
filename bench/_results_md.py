"""Shared by the benchmarks: replace one section of bench/RESULTS.md, leaving the others."""

from __future__ import annotations

import os
from pathlib import Path

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


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
