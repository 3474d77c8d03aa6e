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

__all__ = ["PerplexityResult", "NonFiniteLossError", "evaluate_perplexity"]


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


@torch.no_grad()
def evaluate_perplexity(model, windows: torch.Tensor, batch_size: int = 1, desc: str = "ppl",
                        progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` on `windows` [n, seq_len] (token ids)."""
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n >= 1, seq_len >= 2], got {tuple(windows.shape)}")
    if batch_size <= 0:
        raise ValueError(f"--batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    n, seq_len = windows.shape
    nll_sum = 0.0
    start = time.perf_counter()
    bar = tqdm(total=n, desc=desc, unit="win", disable=not progress, dynamic_ncols=True)
    for b in range(0, n, batch_size):
        ids = windows[b: b + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        # logits [bs, L, V] predict ids[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
        ).view(ids.shape[0], seq_len - 1)
        per_window = nll.sum(dim=1)
        if not torch.isfinite(per_window).all():
            bad = [b + i for i, ok in enumerate(torch.isfinite(per_window).tolist()) if not ok]
            raise NonFiniteLossError(f"{desc}: non-finite loss (NaN/Inf) in window(s) {bad}")
        nll_sum += per_window.double().sum().item()
        bar.update(ids.shape[0])
        done = min(b + batch_size, n)
        bar.set_postfix(ppl=f"{math.exp(nll_sum / (done * (seq_len - 1))):.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    tokens = n * (seq_len - 1)
    ppl = math.exp(nll_sum / tokens)
    return PerplexityResult(ppl=ppl, nll_sum=nll_sum, windows=n, tokens=tokens, seq_len=seq_len,
                            seconds=seconds, tokens_per_second=n * seq_len / seconds if seconds > 0 else float("inf"))
