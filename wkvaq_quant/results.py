"""The results store: one JSON file per (model, configuration), written atomically."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_json", "atomic_write_text", "read_result", "environment_versions", "result_path", "now_iso"]

_PACKAGES = ("torch", "transformers", "datasets", "tokenizers", "accelerate", "safetensors", "lm_eval", "numpy")


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON so that `path` is either the old file, absent, or the complete new file."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` so that `path` is either the old file, absent, or the complete new file.

    The text is written to a temporary file in the same directory, flushed to disk, and
    renamed over `path` (atomic on POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_result(path: str | os.PathLike) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def result_path(results_dir: str | os.PathLike, model_name: str, slug: str) -> Path:
    return Path(results_dir) / model_name / f"{slug}.json"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_versions() -> dict[str, Any]:
    """Package versions, interpreter, platform and the project's commit, for the record."""
    from . import __version__

    versions: dict[str, Any] = {"wkvaq": __version__, "git_commit": _git_commit(),
                                "python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
