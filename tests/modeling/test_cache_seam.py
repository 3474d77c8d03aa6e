"""The KV-cache seam: the cache is found by type whatever transformers calls its keyword, and a
cache the project cannot see fails loudly instead of taking every decoding step for a prompt."""

import importlib

import pytest
import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.modeling import attach
from wkvaq_quant.modeling.attention import STATE_ATTR, LayerState

F = QuantPlan.from_flags
attach_mod = importlib.import_module("wkvaq_quant.modeling.attach")  # the module (the package exports the function)


def _filled_cache(n_tokens: int) -> DynamicCache:
    from transformers import LlamaConfig

    cache = DynamicCache(config=LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2))
    kv = torch.zeros(1, 2, n_tokens, 16)
    cache.update(kv, kv, 0)
    return cache


class _Attn(nn.Module):
    layer_idx = 0


@pytest.mark.parametrize("call", [
    lambda c: ((), {"past_key_values": c}),  # transformers 5.0-5.23
    lambda c: ((), {"cache": c}),            # transformers 5.24
    lambda c: ((), {"some_future_name": c}),
    lambda c: ((torch.zeros(1), c), {}),     # positional
], ids=["past_key_values", "cache", "renamed", "positional"])
def test_cache_found_by_type_under_any_name(call):
    module = _Attn()
    setattr(module, STATE_ATTR, LayerState(plan=F()))
    args, kwargs = call(_filled_cache(5))
    attach_mod._track_cache(module, args, kwargs)
    state = getattr(module, STATE_ATTR)
    assert state.cache_seen and state.past_len == 5 and not state.prefill


def test_no_cache_is_a_prompt_and_two_caches_are_refused():
    module = _Attn()
    setattr(module, STATE_ATTR, LayerState(plan=F()))
    attach_mod._track_cache(module, (), {"cache": None, "use_cache": False})
    assert getattr(module, STATE_ATTR).prefill and not getattr(module, STATE_ATTR).cache_seen
    with pytest.raises(RuntimeError, match="2 KV cache objects"):
        attach_mod._track_cache(module, (), {"a": _filled_cache(1), "b": _filled_cache(1)})


def test_keys_longer_than_queries_without_a_cache_fail_loudly():
    state = LayerState(plan=F(k_bits=4))
    q, k = torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 7, 16)
    with pytest.raises(RuntimeError, match="no KV cache object was found"):
        state.check_call(q, k)
    state.cache_seen, state.past_len = True, 6
    state.check_call(q, k)  # a decoding step: fine
    with pytest.raises(RuntimeError, match="reported 6 cached tokens"):
        state.check_call(q, torch.zeros(1, 2, 1, 16))


@pytest.mark.parametrize("plan", [
    F(k_bits=4, v_bits=4, k_quant_post_rope=True),
    F(k_bits=4, v_bits=4),  # pre-RoPE keys
], ids=["post-rope", "pre-rope"])
def test_generation_with_a_hidden_cache_fails_loudly(tiny_models, input_ids, plan, monkeypatch):
    """What the transformers 5.24 rename did to a keyword lookup (the cache never seen): now an
    error at the first decoding step, not silently wrong tokens."""
    model = tiny_models()
    attach(model, plan)
    monkeypatch.setattr(attach_mod, "find_cache", lambda *a: None)
    with pytest.raises(RuntimeError, match="no KV cache object was found"):
        model.generate(input_ids, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_decoding_steps_see_the_cached_length(tiny_models, input_ids):
    """Through the real transformers call: the prompt is a prefill, each later step knows how many
    tokens the cache already holds."""
    model = tiny_models()
    attach(model, F(k_bits=4, v_bits=4, k_quant_post_rope=True))
    seen = []
    attn = model.model.layers[0].self_attn
    attn.register_forward_hook(lambda m, a, o: seen.append(getattr(m, STATE_ATTR).past_len))
    model.generate(input_ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    t = input_ids.shape[1]
    assert seen == [0, t, t + 1]
