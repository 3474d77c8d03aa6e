"""Print the lock of the current environment: the exact installed version of every package that
requirements.txt and requirements-test.txt need, with all their dependencies, as pip constraints.

    python scripts/lock.py > constraints.txt     # after the suite passed in this environment
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ("requirements.txt", "requirements-test.txt")
UNPINNED = {"pip", "setuptools", "wheel"}  # build tools: pip's own business


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _roots() -> list[Requirement]:
    out = []
    for f in REQUIREMENTS:
        for line in (ROOT / f).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                out.append(Requirement(line))
    return out


def lock() -> dict[str, str]:
    """{normalized name: installed version} of the requirements' dependency closure."""
    pins: dict[str, str] = {}
    todo = _roots()
    while todo:
        req = todo.pop()
        name = _norm(req.name)
        if name in pins or name in UNPINNED:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            sys.exit(f"{req.name} is required but not installed: install the requirements first")
        pins[name] = dist.version.split("+")[0]  # torch 2.13.0+cpu -> 2.13.0 (matches the local build too)
        for dep in dist.requires or []:
            dep = Requirement(dep)
            if dep.marker is None or dep.marker.evaluate({"extra": ""}):
                todo.append(dep)
    return pins


if __name__ == "__main__":
    print("# The exact versions the test suite passed with (pip constraints; made by scripts/lock.py on")
    print(f"# Python {platform.python_version()}, {platform.machine()}). scripts/install.sh installs with them, so")
    print("# both README commands and CI get this environment; torch is the CPU build (never a CUDA wheel).")
    for name, version in sorted(lock().items()):
        print(f"{name}=={version}")
