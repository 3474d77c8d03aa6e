"""Tiny random Llama / Mistral models built in memory (GQA: 4 query heads, 2 KV heads, head_dim 16)."""

from __future__ import annotations

import copy

import pytest
import torch


def build_tiny(arch: str = "llama", impl: str = "sdpa", sliding_window: int | None = None, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=sliding_window))
    model.set_attn_implementation(impl)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_models():
    """(arch, impl, sliding_window) -> a fresh deep copy of a cached tiny model."""
    cache: dict = {}

    def get(arch: str = "llama", impl: str = "sdpa", sliding_window: int | None = None):
        key = (arch, impl, sliding_window)
        if key not in cache:
            cache[key] = build_tiny(arch, impl, sliding_window)
        return copy.deepcopy(cache[key])

    return get


@pytest.fixture(scope="module")
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (2, 24), generator=g)


@pytest.fixture(autouse=True)
def small_eager_blocks(monkeypatch):
    """Blocks of 5 query rows, so the 24-token test prompts run the eager attention's blocking
    and key-range skipping (blocks of a causal or sliding-window mask)."""
    from wkvaq_quant.modeling import attention

    monkeypatch.setattr(attention, "EAGER_BLOCK_ROWS", 5)
