"""Tiny models for the AWQ tests."""

from __future__ import annotations

import torch

from tests.modeling.conftest import build_tiny

OUTLIERS = (3, 17, 40)


def planted_model(seed: int = 0):
    """Tiny GQA Llama whose norm outputs have a few outlier channels (x30), as real LLMs do."""
    model = build_tiny("llama", seed=seed)
    with torch.no_grad():
        for block in model.model.layers:
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight[list(OUTLIERS)] *= 30.0
    return model


def calib_ids(n: int = 8, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (n, seq), generator=torch.Generator().manual_seed(seed))
