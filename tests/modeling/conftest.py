"""Tiny random decoders of every supported family, built in memory (GQA; see build_tiny)."""

from __future__ import annotations

import copy

import pytest
import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
"""Every family of the architecture registry; the test matrix runs over them."""

GEMMA3_WINDOW = 8
"""Gemma-3's tiny model: layer 0 slides over 8 tokens, layer 1 is global (24-token prompts)."""


def tiny_config(arch: str = "llama", sliding_window: int | None = None, **over):
    """A tiny config of `arch` (4 query heads; 2 KV heads, head_dim 16, except Gemma-3: 1 KV head and
    head_dim 32, so heads x head_dim (128) differs from the hidden size (64), and a query scale of
    query_pre_attn_scalar 24 ** -0.5, not head_dim's)."""
    import transformers as tf

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  tie_word_embeddings=False)
    common.update(over)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=sliding_window)
    if arch == "qwen2":  # biases on q/k/v; a window on layer 1 only when asked (max_window_layers 1)
        return tf.Qwen2Config(**common, use_sliding_window=sliding_window is not None,
                              sliding_window=sliding_window or 4096, max_window_layers=1)
    if arch == "qwen3":
        return tf.Qwen3Config(**common)
    if arch == "gemma3":
        common.update(num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)
        common.update(over)
        window = GEMMA3_WINDOW if sliding_window is None else sliding_window
        return tf.Gemma3TextConfig(**common, query_pre_attn_scalar=24, sliding_window=window,
                                   layer_types=["sliding_attention", "full_attention"] * (common["num_hidden_layers"] // 2))
    raise ValueError(arch)


@torch.no_grad()
def randomize_offsets(model) -> None:
    """Random biases (Qwen2's q/k/v) and norm weights: the families initialize them to 0 / 1 (Gemma's
    (1 + w) norms to w = 0), which would hide a fold or a tap in the wrong place."""
    g = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if name.endswith("bias") or ("norm" in name and p.dim() == 1):
            base = 0.0 if name.endswith("bias") or "gemma3" in type(model).__name__.lower() else 1.0
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))


def build_tiny(arch: str = "llama", impl: str = "sdpa", sliding_window: int | None = None, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, sliding_window))
    if arch not in ("llama", "mistral"):  # (their tests were written against the default init)
        randomize_offsets(model)
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
