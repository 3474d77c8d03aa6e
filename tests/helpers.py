"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations


def main_argv(model, tmp_path, *extra: str) -> list[str]:
    """argv for main.py writing results under `tmp_path`, without progress bars."""
    return ["--model", str(model), "--results_dir", str(tmp_path / "results"), "--no_progress", *extra]
