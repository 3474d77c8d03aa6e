"""Block-by-block runner: captured kwargs, sequential outputs equal the model's, next-input modes."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.modeling.conftest import build_tiny
from wkvaq_quant.modeling.attach import decoder_blocks
from wkvaq_quant.weights.blocks import capture_block_inputs, for_each_block, run_block


@pytest.fixture(scope="module")
def model():
    return build_tiny("llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(0))


def _final_hidden(m, ids):
    """The last decoder block's output, from the full model (hidden_states[-1] is after the norm)."""
    seen = []
    h = decoder_blocks(m)[-1].register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        m(ids, use_cache=False)
    h.remove()
    return seen[0]


def test_capture_keeps_every_kwarg_and_only_block0_runs(model, ids):
    calls = []
    hooks = [b.register_forward_pre_hook(lambda m, a: calls.append(m)) for b in decoder_blocks(model)]
    inputs = capture_block_inputs(model, ids, batch_size=2)
    for h in hooks:
        h.remove()
    assert [x.shape for x in inputs.hidden] == [(2, 20, 64), (1, 20, 64)]
    kw = inputs.kwargs[0]
    assert {"position_embeddings", "attention_mask", "position_ids"} <= set(kw)
    cos, sin = kw["position_embeddings"]
    assert cos.shape[-2:] == (20, 16) and sin.shape[-2:] == (20, 16)
    assert calls == [decoder_blocks(model)[0]] * 2  # the forward stopped at block 0 each time
    with torch.no_grad():
        emb = model.model.embed_tokens(ids)
    assert torch.equal(torch.cat(inputs.hidden), emb)


def test_blocks_in_sequence_equal_the_model(model, ids):
    inputs = capture_block_inputs(model, ids, batch_size=2)
    last = for_each_block(model, inputs, lambda i, b, x: None, progress=False)
    torch.testing.assert_close(torch.cat(last.hidden), torch.cat([_final_hidden(model, ids[:2]),
                                                                  _final_hidden(model, ids[2:])]),
                               rtol=1e-5, atol=1e-5)


def test_next_inputs_fp_or_quantized(model, ids):
    def zero_o_proj(i, block, x):
        block.self_attn.o_proj.weight.mul_(0.5)

    fp_model, q_model = copy.deepcopy(model), copy.deepcopy(model)
    fp_last = for_each_block(fp_model, capture_block_inputs(fp_model, ids), zero_o_proj, next_inputs="fp",
                             progress=False)
    q_last = for_each_block(q_model, capture_block_inputs(q_model, ids), zero_o_proj, next_inputs="quantized",
                            progress=False)
    # both models were changed the same way
    assert all(torch.equal(a, b) for a, b in zip(fp_model.state_dict().values(), q_model.state_dict().values()))
    # "quantized": what the changed model computes; "fp": what the original model computes
    torch.testing.assert_close(torch.cat(q_last.hidden), _final_hidden(q_model, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(fp_last.hidden), _final_hidden(model, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(torch.cat(q_last.hidden), torch.cat(fp_last.hidden), atol=1e-3)


def test_run_block_and_bad_inputs(model, ids):
    inputs = capture_block_inputs(model, ids)
    out = run_block(decoder_blocks(model)[0], inputs, "cpu").hidden
    assert len(out) == 3 and out[0].shape == (1, 20, 64)
    with pytest.raises(ValueError, match="next_inputs='x'"):
        for_each_block(model, inputs, lambda *a: None, next_inputs="x")
    with pytest.raises(ValueError, match="n_samples"):
        capture_block_inputs(model, ids[0])
