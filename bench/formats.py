"""Number-format speed: fake_quantize time as a multiple of `x.clone()` measured in the same run.

    python bench/formats.py            # print the tables
    python bench/formats.py --write    # and update the section in bench/RESULTS.md
    python bench/formats.py --no_peers # skip the naive reference implementations (slow)

Shapes: a 4096 x 11008 fp32 weight (group 128) and a 2048 x 4096 fp32 activation (per token).
Each timing is the best of `--repeats` runs; clone and format runs are interleaved so both see
the same machine state. Goals: INT and FP8 <= 4x clone, BitMoD <= 40x clone.

Two allocator regimes are measured, because the baseline itself changes by about 4x between
them: "default" (glibc returns large blocks to the OS, so every fresh tensor, the clone's
included, pays page faults) and "heap reuse" (a child process with MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ raised, so freed blocks are reused and the clone is a plain memcpy).
The peers are straightforward implementations (AWQ's pseudo_quantize_tensor for INT, BitMoD's
reference quantizer: one torch.where per grid value and a candidate loop) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results_md import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wkvaq_quant.config import QuantArgs  # noqa: E402
from wkvaq_quant.formats import BITMOD_GRIDS  # noqa: E402
from wkvaq_quant.quantize import fake_quantize  # noqa: E402

SECTION = "## Number formats (bench/formats.py)"
GOALS = {"int": 4.0, "fp8_e4m3": 4.0, "bitmod": 40.0}


# ------------------------------------------------------------------ naive peers ---
def naive_int_asym(w: torch.Tensor, bits: int = 4, group_size: int = 128) -> torch.Tensor:
    """AWQ-style pseudo_quantize_tensor (out of place, one temporary per step)."""
    shape = w.shape
    w = w.reshape(-1, group_size)
    max_val, min_val = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
    max_int = 2**bits - 1
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp_(0, max_int)
    w = (torch.clamp(torch.round(w / scales) + zeros, 0, max_int) - zeros) * scales
    return w.reshape(shape)


def _naive_grid(w: torch.Tensor, values: tuple[float, ...]) -> torch.Tensor:
    mids = [(values[i] + values[i + 1]) / 2 for i in range(len(values) - 1)]
    s = (w.abs().amax(dim=-1, keepdim=True) / max(abs(v) for v in values)).clamp(min=1e-5)
    x = w / s
    q = torch.zeros_like(x)
    for i, v in enumerate(values):
        if i == 0:
            q += torch.where(x <= mids[0], v, 0.0)
        elif i == len(values) - 1:
            q += torch.where(x > mids[-1], v, 0.0)
        else:
            q += torch.where((mids[i - 1] < x) & (x <= mids[i]), v, 0.0)
    return q * s


def naive_bitmod(w: torch.Tensor, bits: int = 3, group_size: int = 128) -> torch.Tensor:
    """BitMoD reference style: quantize to each grid with one where per value, keep the best."""
    shape = w.shape
    w = w.reshape(w.shape[0], -1, group_size)
    best = torch.zeros_like(w)
    err = torch.full(w.shape[:2], float("inf"))
    for values in BITMOD_GRIDS[bits]:
        q = _naive_grid(w, values)
        e = (q - w).pow(2).mean(-1)
        upd = e < err
        err[upd] = e[upd]
        best[upd] = q[upd]
    return best.reshape(shape)


# ---------------------------------------------------------------------- timing ---
def _best_ratio(fn: Callable[[], object], x: torch.Tensor, repeats: int) -> tuple[float, float, float]:
    """Best-of-`repeats` seconds of fn and of x.clone(), interleaved; returns (fn_s, clone_s, ratio)."""
    fn()  # warm-up (allocator, lazy init)
    t_fn, t_clone = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.clone()
        t_clone.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fn()
        t_fn.append(time.perf_counter() - t0)
    f, c = min(t_fn), min(t_clone)
    return f, c, f / c


def _cases(peers: bool) -> list[tuple[str, str, str, Callable[[torch.Tensor], object] | QuantArgs]]:
    """(tensor, label, goal key, QuantArgs or a naive callable)."""
    wa = dict(group_size=128)
    cases: list = [
        ("weight", "int4 asym, int zero", "int", QuantArgs(bits=4, **wa)),
        ("weight", "int4 asym, float zero", "int", QuantArgs(bits=4, zero_point="float", **wa)),
        ("weight", "int4 sym", "int", QuantArgs(bits=4, symmetric=True, **wa)),
        ("weight", "int4 asym + double quant", "int", QuantArgs(bits=4, double_quant=True, **wa)),
        ("weight", "fp8_e4m3", "fp8_e4m3", QuantArgs(bits=8, dtype="fp8_e4m3", **wa)),
        ("weight", "fp4_e2m1", "", QuantArgs(bits=4, dtype="fp4_e2m1", **wa)),
        ("weight", "bitmod 3-bit", "bitmod", QuantArgs(bits=3, dtype="bitmod", **wa)),
        ("weight", "bitmod 4-bit", "bitmod", QuantArgs(bits=4, dtype="bitmod", **wa)),
        ("activation", "fp8_e4m3 per token", "fp8_e4m3", QuantArgs(bits=8, dtype="fp8_e4m3", target="activation")),
        ("activation", "int8 sym per token", "int", QuantArgs(bits=8, symmetric=True, target="activation")),
        ("activation", "int8 asym per token", "int", QuantArgs(bits=8, target="activation")),
        ("activation", "ufloat8 (P, E4M4)", "", QuantArgs(bits=8, dtype="ufloat", target="prob")),
        ("activation", "ufloat12 (P, E5M7)", "", QuantArgs(bits=12, dtype="ufloat", target="prob")),
    ]
    if peers:
        cases += [
            ("weight", "peer: naive int4 asym (AWQ style)", "", naive_int_asym),
            ("weight", "peer: naive bitmod 3-bit (reference style)", "", naive_bitmod),
        ]
    return cases


def measure(repeats: int, peers: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    tensors = {"weight": torch.randn(4096, 11008, generator=g), "activation": torch.randn(2048, 4096, generator=g)}
    rows = []
    for tname, label, goal_key, spec in _cases(peers):
        x = tensors[tname]
        if isinstance(spec, QuantArgs):
            fn = (lambda x=x, a=spec: fake_quantize(x, a))  # noqa: E731
        else:
            fn = (lambda x=x, f=spec: f(x))  # noqa: E731
        reps = 1 if label.startswith("peer: naive bitmod") else repeats
        f_s, c_s, ratio = _best_ratio(fn, x, reps)
        rows.append(dict(tensor=tname, label=label, fn_s=f_s, clone_s=c_s, ratio=ratio, goal=GOALS.get(goal_key)))
        print(f"  {tname:10s} {label:45s} {f_s * 1e3:9.1f} ms  clone {c_s * 1e3:7.1f} ms  {ratio:6.2f}x",
              file=sys.stderr, flush=True)
    return rows


HEAP_REUSE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32)}


def _table(rows: list[dict]) -> list[str]:
    lines = ["| tensor | format | time | x.clone() | ratio | goal |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        goal = r["goal"]
        goal_txt = "" if goal is None else f"<= {goal:g}x: " + ("yes" if r["ratio"] <= goal else "**no**")
        lines.append(f"| {r['tensor']} | {r['label']} | {r['fn_s'] * 1e3:.0f} ms | {r['clone_s'] * 1e3:.1f} ms "
                     f"| {r['ratio']:.2f}x | {goal_txt} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no_peers", action="store_true", help="skip the naive peer implementations")
    p.add_argument("--write", action="store_true", help="update the section in bench/RESULTS.md")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child: one regime, JSON on stdout
    args = p.parse_args()

    if args.json:
        print(json.dumps(measure(args.repeats, not args.no_peers)))
        return
    print("regime: default", file=sys.stderr)
    default = measure(args.repeats, not args.no_peers)
    print("regime: heap reuse", file=sys.stderr)
    child = [sys.executable, __file__, "--json", "--repeats", str(args.repeats)] + (["--no_peers"] if args.no_peers else [])
    out = subprocess.run(child, env={**os.environ, **HEAP_REUSE_ENV}, stdout=subprocess.PIPE, text=True, check=True)
    heap = json.loads(out.stdout)

    lines = [
        SECTION,
        "",
        f"Command: `python bench/formats.py --write` (best of {args.repeats}, clone and format interleaved; "
        f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, torch {torch.__version__}).",
        "Weight: 4096 x 11008 fp32, group 128. Activation: 2048 x 4096 fp32, per token.",
        "",
        "Default allocator (every fresh tensor, the clone's included, is page-faulted in):",
        "",
        *_table(default),
        "",
        "Heap reuse (`MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` = 4 GiB: freed blocks are reused,",
        "so `x.clone()` is a plain memcpy and the ratio counts compute passes only):",
        "",
        *_table(heap),
        "",
        "Notes. The issue's reference point (a naive INT about 7.5x a clone) matches the heap-reuse regime;",
        "in the default regime every result also pays the same page faults as the clone, which halves the",
        "ratios. Per element, INT is 2 reductions + 4-5 in-place passes, FP8/FP4 2 reductions + 7 passes",
        "(divide, the exact round-to-nearest-even `(y + C) - C` with C built from the exponent bits, rescale);",
        "BitMoD scores its four grids with about 40 passes (two shared scales, error gain of each extra value) and",
        "rounds once more with the chosen grid. Timings on this shared 2-core VM vary by about 10-20%",
        "between runs, and by far more while another process holds a core.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
