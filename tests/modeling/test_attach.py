"""attach(): identity at 16 bits, idempotence, exact removal, W / A placement, refusals."""

import importlib

import pytest
import torch
from torch import nn

from wkvaq_quant.config import QuantArgs

from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.modeling import EAGER, SDPA, attach, decoder_linears, find_attention_modules
from wkvaq_quant.quantize import fake_quantize
from tests.modeling.conftest import FAMILIES

CASES = [("llama", "sdpa", None), ("llama", "eager", None), ("mistral", "sdpa", 8), ("mistral", "eager", 8),
         ("qwen2", "sdpa", None), ("qwen2", "eager", 8), ("qwen3", "sdpa", None), ("qwen3", "eager", None),
         ("gemma3", "sdpa", None), ("gemma3", "eager", None)]  # Gemma-3: layer 0 slides over 8 tokens
QUANT = QuantPlan.from_flags(w_bits=4, w_group_size=16, a_bits=8, q_bits=8, k_bits=4, v_bits=4,
                             kv_residual_len=4, apply_k_scale=True)


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


@pytest.mark.parametrize("arch,impl,window", CASES)
def test_all_16_bits_is_bit_identical_and_remove_restores(tiny_models, input_ids, arch, impl, window):
    model = tiny_models(arch, impl, window)
    ref = _logits(model, input_ids)
    handle = attach(model, QuantPlan())
    assert model.config._attn_implementation == (SDPA if impl == "sdpa" else EAGER)  # our function runs
    assert torch.equal(_logits(model, input_ids), ref)
    assert attach(model, QuantPlan()) is handle  # attaching twice is a no-op
    handle.remove()
    handle = attach(model, QUANT)
    quant = _logits(model, input_ids)
    assert not torch.allclose(quant, ref)
    assert attach(model, QUANT) is handle
    assert torch.equal(_logits(model, input_ids), quant)  # a second attach changed nothing
    handle.remove()
    assert model.config._attn_implementation == impl
    assert torch.equal(_logits(model, input_ids), ref)


@pytest.mark.parametrize("arch,full_window", [("mistral", None), ("qwen2", None), ("gemma3", 512)])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_sliding_window_is_kept(tiny_models, input_ids, arch, full_window, impl):
    """A window of 8 < 24 tokens (Mistral: every layer; Qwen2: layer 1; Gemma-3: layer 0 of its
    interleaved pattern) must survive the registered mask function, also with quantized attention."""
    windowed, full = tiny_models(arch, impl, 8), tiny_models(arch, impl, full_window)
    full.load_state_dict(windowed.state_dict())
    assert not torch.allclose(_logits(windowed, input_ids), _logits(full, input_ids))
    ref = _logits(windowed, input_ids)
    handle = attach(windowed, QuantPlan())
    assert torch.equal(_logits(windowed, input_ids), ref)
    handle.remove()
    plan = QuantPlan.from_flags(k_bits=4, v_bits=4, p_bits=8, k_quant_post_rope=True)
    attach(windowed, plan)
    attach(full, plan)
    assert not torch.allclose(_logits(windowed, input_ids), _logits(full, input_ids))


def test_different_plan_needs_remove_first(tiny_models):
    model = tiny_models()
    attach(model, QuantPlan())
    with pytest.raises(ValueError, match="remove"):
        attach(model, QUANT)


@pytest.mark.parametrize("arch", FAMILIES)
def test_weights_rtn_once_decoder_linears_only(tiny_models, arch):
    model = tiny_models(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = attach(model, QUANT)
    lin = decoder_linears(model)
    assert len(lin) == 2 * 7
    after = model.state_dict()
    for name, w in before.items():
        mod = name.rsplit(".weight", 1)[0]
        if mod in lin:
            assert torch.equal(after[name], fake_quantize(w, QUANT.w)), name
        else:  # embeddings, norms, biases, lm_head untouched
            assert torch.equal(after[name], w), name
    handle.remove()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def _fp8_per_token(x):
    """Independent FP8 E4M3 per token: scale amax/448, round through torch's float8 dtype."""
    s = x.abs().amax(-1, keepdim=True).clamp_min(2.0**-126) / 448
    return (x / s).to(torch.float8_e4m3fn).float() * s


def test_activation_inputs_fp8_per_token(tiny_models, input_ids):
    model, ref = tiny_models(), tiny_models()
    attach(model, QuantPlan(a=QuantArgs(bits=8, dtype="fp8_e4m3", target="activation")))
    for lin in decoder_linears(ref).values():
        lin.register_forward_pre_hook(lambda m, inp: (_fp8_per_token(inp[0]),))
    torch.testing.assert_close(_logits(model, input_ids), _logits(ref, input_ids), rtol=0, atol=1e-5)


def test_shared_linear_inputs_are_quantized_once(tiny_models, input_ids, monkeypatch):
    """q/k/v_proj and gate/up_proj read the same tensor: 4 input quantizations per block, not 7,
    and the logits equal those of quantizing every input separately (the test above)."""
    attach_mod = importlib.import_module("wkvaq_quant.modeling.attach")

    calls = []
    real = attach_mod.fake_quantize
    monkeypatch.setattr(attach_mod, "fake_quantize", lambda x, a: calls.append(a.target) or real(x, a))
    model, ref = tiny_models(), tiny_models()
    attach(model, QuantPlan(a=QuantArgs(bits=8, dtype="fp8_e4m3", target="activation")))
    for lin in decoder_linears(ref).values():
        lin.register_forward_pre_hook(lambda m, inp: (_fp8_per_token(inp[0]),))
    got = _logits(model, input_ids)
    assert calls.count("activation") == 2 * 4  # 2 blocks x (qkv, o, gate/up, down)
    torch.testing.assert_close(got, _logits(ref, input_ids), rtol=0, atol=1e-5)


def test_unsupported_architecture_is_refused():
    class NotADecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="not supported"):
        attach(NotADecoder(), QuantPlan())


@pytest.mark.parametrize("method", ["KTVT", "KCVT"])
def test_sequence_shorter_than_the_residual_stays_full_precision(tiny_models, input_ids, method):
    model, fp = tiny_models(), tiny_models()
    attach(model, QuantPlan.from_flags(k_bits=2, v_bits=2, k_group_size=8, kv_quant_method=method,
                                       kv_residual_len=32, k_quant_post_rope=True))
    torch.testing.assert_close(_logits(model, input_ids), _logits(fp, input_ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_logit_softcapping_is_refused_not_dropped(tiny_models, input_ids, impl):
    """A model that passes softcap= to its attention function (Gemma-2 style) is refused by the quantized
    attention; without quantized attention the family's own function computes it."""
    from wkvaq_quant.modeling.attention import wkvaq_eager_attention, wkvaq_sdpa_attention

    model = tiny_models("gemma3", impl)
    attach(model, QuantPlan.from_flags(k_bits=4, v_bits=4))
    attn = find_attention_modules(model)[0]
    q, k = torch.randn(1, 4, 3, 32), torch.randn(1, 1, 3, 32)
    fn = wkvaq_sdpa_attention if impl == "sdpa" else wkvaq_eager_attention
    with pytest.raises(ValueError, match="soft-capping .softcap=50.0.*attn_logit_softcapping null"):
        fn(attn, q, k, k.clone(), None, scaling=0.2, softcap=50.0)
