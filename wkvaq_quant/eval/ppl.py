"""Perplexity over fixed windows, as in GPTQ / AWQ / P3-LLM.

Each window is one forward pass; the loss of a window is the mean next-token cross
entropy over its `seq_len - 1` predicted positions, and the perplexity is
exp(sum of token NLLs / number of predicted tokens). With equal-length windows this is
exactly GPTQ's exp(mean over windows of (loss * seq_len)) / seq_len form.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, asdict

import torch
from tqdm.auto import tqdm
from ..userfiles import UserError

__all__ = ["PerplexityMeter", "PerplexityResult", "NonFiniteLossError", "check_windows", "evaluate_perplexity"]


class NonFiniteLossError(UserError):
    """The model produced NaN or Inf loss: reported as an error, never as a number."""


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float
    windows: int
    tokens: int  # predicted tokens (windows * (seq_len - 1))
    seq_len: int
    seconds: float
    tokens_per_second: float  # input tokens through the model per second

    def to_dict(self) -> dict:
        return asdict(self)


class PerplexityMeter:
    """Sums the next-token NLL of windows batch by batch (with a progress bar) into a
    PerplexityResult; in-memory and block-streamed evaluation share it, so their numbers are
    computed by the same operations on the same tensors."""

    def __init__(self, n: int, seq_len: int, desc: str = "ppl", progress: bool = True) -> None:
        self.n, self.seq_len, self.desc = n, seq_len, desc
        self.nll_sum, self.done = 0.0, 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=n, desc=desc, unit="win", disable=not progress, dynamic_ncols=True)

    def add(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        """Add a batch: `logits` [bs, L, V] of the windows `ids` [bs, L] (they predict ids[:, 1:])."""
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
        ).view(ids.shape[0], self.seq_len - 1)
        per_window = nll.sum(dim=1)
        if not torch.isfinite(per_window).all():
            bad = [self.done + i for i, ok in enumerate(torch.isfinite(per_window).tolist()) if not ok]
            self.bar.close()
            raise NonFiniteLossError(f"{self.desc}: non-finite loss (NaN/Inf) in window(s) {bad}")
        self.nll_sum += per_window.double().sum().item()
        self.done += ids.shape[0]
        self.bar.update(ids.shape[0])
        self.bar.set_postfix(ppl=f"{math.exp(self.nll_sum / (self.done * (self.seq_len - 1))):.3f}")

    def result(self, seconds: float | None = None) -> PerplexityResult:
        """The perplexity of every window added (`seconds`: the time to report, default since creation)."""
        self.bar.close()
        if self.done != self.n:
            raise RuntimeError(f"{self.desc}: {self.done} of {self.n} windows evaluated")
        seconds = time.perf_counter() - self.start if seconds is None else seconds
        tokens = self.n * (self.seq_len - 1)
        return PerplexityResult(ppl=math.exp(self.nll_sum / tokens), nll_sum=self.nll_sum, windows=self.n,
                                tokens=tokens, seq_len=self.seq_len, seconds=seconds,
                                tokens_per_second=self.n * self.seq_len / seconds if seconds > 0 else float("inf"))


def check_windows(windows: torch.Tensor, batch_size: int) -> None:
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n >= 1, seq_len >= 2], got {tuple(windows.shape)}")
    if batch_size <= 0:
        raise ValueError(f"--batch_size must be positive, got {batch_size}")


@torch.no_grad()
def evaluate_perplexity(model, windows: torch.Tensor, batch_size: int = 1, desc: str = "ppl",
                        progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` on `windows` [n, seq_len] (token ids)."""
    check_windows(windows, batch_size)
    device = next(model.parameters()).device
    meter = PerplexityMeter(*windows.shape, desc=desc, progress=progress)
    for b in range(0, windows.shape[0], batch_size):
        ids = windows[b: b + batch_size].to(device)
        meter.add(model(input_ids=ids, use_cache=False).logits, ids)
    return meter.result()
