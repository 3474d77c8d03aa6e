"""generate() with a quantized KV cache; k-scale frozen at the prompt; --kv_quant_post_attn."""

import pytest
import torch

from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.modeling import attach

from tests.modeling.conftest import FAMILIES

F = QuantPlan.from_flags
NEW = 6


def _generate(model, ids, use_cache=True):
    out = model.generate(ids, max_new_tokens=NEW, do_sample=False, use_cache=use_cache, pad_token_id=0,
                         return_dict_in_generate=True, output_scores=True)
    return out.sequences, torch.stack(out.scores)


def _assert_cached_equals_recomputed(model, input_ids, plan) -> None:
    """Greedy decoding from the quantized cache gives the tokens (and scores) of recomputing the
    whole sequence at every step."""
    attach(model, plan)
    cached, cached_scores = _generate(model, input_ids)
    full, full_scores = _generate(model, input_ids, use_cache=False)
    assert torch.equal(cached, full)
    torch.testing.assert_close(cached_scores, full_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("plan", [
    F(k_bits=3, v_bits=3, q_bits=8, k_quant_post_rope=True),
    F(k_bits=3, v_bits=3, k_group_size=16),  # pre-RoPE
    F(k_bits=3, v_bits=4, p_bits=8, k_quant_post_rope=True),
], ids=["KTVT-postrope-q8", "KTVT-prerope", "p8-fold"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_recomputing_the_whole_sequence(tiny_models, input_ids, plan, family):
    """Per-token K / V: a cache re-quantized as it grows gives what a forward over the whole sequence gives
    (Gemma-3: also on its sliding layer, whose cache keeps only the window's last tokens)."""
    _assert_cached_equals_recomputed(tiny_models(family), input_ids, plan)


@pytest.mark.parametrize("plan", [
    F(k_bits=3, v_bits=3, kv_residual_len=4, k_quant_post_rope=True),
    F(k_bits=2, v_bits=3, k_group_size=4, kv_quant_method="KCVT", kv_residual_len=4, k_quant_post_rope=True),
], ids=["KTVT-r4", "KCVT-g4-r4"])
def test_generation_with_residual_and_kcvt(tiny_models, input_ids, plan):
    """The cache keeps the newest tokens in full precision as it grows; the prompt step equals one forward.

    Later steps differ from recomputing the sequence: there the last R positions of the whole
    sequence are full precision for every query (and KCVT groups see later tokens)."""
    model = tiny_models()
    attach(model, plan)
    cached, cached_scores = _generate(model, input_ids)
    _, full_scores = _generate(model, input_ids, use_cache=False)
    assert cached.shape == (2, input_ids.shape[1] + NEW)
    torch.testing.assert_close(cached_scores[0], full_scores[0], rtol=0, atol=1e-5)
    assert (cached_scores[1:] - full_scores[1:]).abs().max() > 1e-6


@pytest.mark.parametrize("post_rope", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_k_scale_frozen_at_the_prompt(tiny_models, input_ids, post_rope, family):
    """With 16-bit keys the frozen statistics still compensate exactly: scores equal FP."""
    fp, fp_scores = _generate(tiny_models(family), input_ids)
    model = tiny_models(family)
    attach(model, F(apply_k_scale=True, apply_k_bias=True, k_quant_post_rope=post_rope))
    seq, scores = _generate(model, input_ids)
    assert torch.equal(seq, fp)
    torch.testing.assert_close(scores, fp_scores, rtol=0, atol=1e-4)
    state = next(m for m in model.modules() if hasattr(m, "_wkvaq"))._wkvaq
    assert state.k_stats[0].shape == (2, 1, 32)  # [B, 1, Hkv*d] (2 x 16; Gemma-3 1 x 32), computed on the prompt
    prompt_keys = state.k_stats[0].clone()
    with torch.no_grad():
        model((input_ids * 7 + 3) % 97)  # a new prompt recomputes them
    assert not torch.equal(state.k_stats[0], prompt_keys)


def test_pre_rope_residual_cannot_be_decoded(tiny_models, input_ids):
    model = tiny_models()
    attach(model, F(k_bits=4, kv_residual_len=4))
    with pytest.raises(ValueError, match="add --k_quant_post_rope"):
        _generate(model, input_ids)


def test_post_attn_prompt_in_full_precision_cache_quantized(tiny_models, input_ids):
    plan = F(k_bits=2, v_bits=2, k_quant_post_rope=True, kv_quant_post_attn=True)
    fp_model, model = tiny_models(), tiny_models()
    attach(model, plan)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, fp_model(input_ids).logits)  # one forward: nothing changes
    _, fp_scores = _generate(fp_model, input_ids)
    _, scores = _generate(model, input_ids)
    torch.testing.assert_close(scores[0], fp_scores[0], rtol=0, atol=1e-5)  # first token: from the prompt
    assert (scores[1:] - fp_scores[1:]).abs().max() > 1e-3  # later tokens read the quantized cache
    with pytest.raises(ValueError, match="--kv_quant_post_attn needs --k_quant_post_rope"):
        F(k_bits=2, kv_quant_post_attn=True)


@pytest.mark.parametrize("plan", [
    F(k_bits=3, v_bits=3, q_bits=8, kv_residual_len=4, kv_residual_mode="per_query", k_quant_post_rope=True),
    F(k_bits=2, v_bits=3, k_group_size=4, kv_quant_method="KCVT", kv_residual_len=4, kv_residual_mode="per_query",
      k_quant_post_rope=True),
    F(v_bits=3, p_bits=8, kv_residual_len=4, kv_residual_mode="per_query"),
], ids=["KTVT", "KCVT", "v-p8-fold"])
@pytest.mark.parametrize("family", FAMILIES)
def test_per_query_residual_is_what_a_decoder_computes(tiny_models, input_ids, plan, family):
    """Recomputing the sequence in per_query mode equals decoding from the cache (whose newest R tokens are FP).

    Not KCVT on Gemma-3's sliding layer: its cache drops the tokens that left the window, so the
    token groups of the per-channel keys start elsewhere than in a forward over the whole sequence
    (see docs/quantization.md); test_kcvt_on_a_sliding_layer_groups_the_keys_it_receives."""
    if family == "gemma3" and plan.kv.method == "KCVT":
        pytest.skip("KCVT groups on a sliding layer: see test_kcvt_on_a_sliding_layer_groups_the_keys_it_receives")
    _assert_cached_equals_recomputed(tiny_models(family), input_ids, plan)


def test_kcvt_on_a_sliding_layer_groups_the_keys_it_receives(tiny_models, input_ids):
    """Gemma-3 with a window wider than the sequence (nothing leaves the cache) decodes KCVT exactly as it
    recomputes; with the window of 8, the evicted tokens shift the token groups and the scores differ."""
    plan = F(k_bits=2, v_bits=3, k_group_size=4, kv_quant_method="KCVT", kv_residual_len=4,
             kv_residual_mode="per_query", k_quant_post_rope=True)
    _assert_cached_equals_recomputed(tiny_models("gemma3", "sdpa", 512), input_ids, plan)
    model = tiny_models("gemma3")
    attach(model, plan)
    _, cached = _generate(model, input_ids)
    _, full = _generate(model, input_ids, use_cache=False)
    torch.testing.assert_close(cached[0], full[0], rtol=0, atol=1e-5)  # the prompt: one forward either way
    assert (cached[1:] - full[1:]).abs().max() > 1e-4


def test_per_query_needs_post_rope_keys():
    with pytest.raises(ValueError, match="--kv_residual_mode per_query needs --k_quant_post_rope"):
        F(k_bits=4, kv_residual_len=4, kv_residual_mode="per_query")
