"""The results store: one JSON file per (model, configuration), written atomically."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .userfiles import reading

__all__ = ["atomic_write_json", "atomic_write_text", "check_writable", "clean_stale_tmp", "environment_versions", "file_mode",
           "now_iso", "read_result", "result_path", "write_result"]

_PACKAGES = ("torch", "transformers", "datasets", "tokenizers", "accelerate", "safetensors", "lm_eval", "numpy")


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON so that `path` is either the old file, absent, or the complete new file."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n")


def file_mode() -> int:
    """The mode a new file gets under the user's umask (mkstemp's 0600 is not what they asked for)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` so that `path` is either the old file, absent, or the complete new file.

    The text is written to a temporary file in the same directory, flushed to disk, given the
    user's umask mode, and renamed over `path` (atomic on POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), file_mode())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


STALE_TMP_S = 60.0
"""A temporary file of a result write older than this is left by a killed process (a write takes
milliseconds)."""


def clean_stale_tmp(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files killed writes of `path` left beside it; returns them."""
    path = Path(path)
    now = time.time()
    gone = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp") if path.parent.is_dir() else ():
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
                gone.append(tmp)
        except OSError:
            continue
    return gone


def check_writable(directory: str | os.PathLike, flag: str = "--results_dir") -> None:
    """Refuse, naming `flag`, a directory that cannot be created or written (before any work)."""
    d = Path(directory)
    for parent in (d, *d.parents):
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{flag} {directory}: {parent} is a file, not a directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".wkvaq-write-check.", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{flag} {directory}: cannot write there ({type(err).__name__}: {err.strerror or err}); "
                         f"allowed: a writable directory") from None


def write_result(path: str | os.PathLike, record: dict) -> None:
    """Write a result atomically; when that fails (disk full, permissions changed), save it in the
    temporary directory instead and raise naming both, so a finished evaluation is never lost."""
    try:
        atomic_write_json(path, record)
    except OSError as err:
        path = Path(path)
        rescue = Path(tempfile.gettempdir()) / f"wkvaq-{path.parent.name}-{path.name}"
        try:
            atomic_write_json(rescue, record)
        except OSError:
            sys.stderr.write(json.dumps(record, indent=1, default=str) + "\n")
            raise ValueError(f"cannot write {path} ({err.strerror or err}) nor {rescue}; the result is printed "
                             f"above") from None
        raise ValueError(f"cannot write {path} ({err.strerror or err}); the result was saved to {rescue}") from None


def read_result(path: str | os.PathLike) -> dict | None:
    """The result record at `path` (None when there is none); a file that is not one is an error
    naming it (remove it or pass --overwrite)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with reading(path, "result file"):
            record = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("results", {}), dict):
                raise ValueError("not a result record (a JSON object with a 'results' mapping)")
            return record
    except ValueError as err:
        raise ValueError(f"{err}; remove it or pass --overwrite") from None


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
