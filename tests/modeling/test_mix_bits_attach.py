"""A mix_bits map attached to a tiny Llama equals the same per-layer quantization applied by hand."""

from __future__ import annotations

import pytest
import torch
import yaml

from wkvaq_quant.config import QuantArgs

from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.mix_bits import parse_quant_config
from wkvaq_quant.modeling import attach
from wkvaq_quant.modeling.attach import block_linears, decoder_blocks
from wkvaq_quant.modeling.attention import STATE_ATTR
from tests.modeling.conftest import FAMILIES
from wkvaq_quant.quantize import fake_quantize

MIXED = """
quant:
  method: RTN
  weight: {bit: 4, symmetric: False, granularity: per_group, group_size: 16}
  act: {bit: 8, symmetric: True, granularity: per_token}
  mix_bits:
    setting_0:
      layer_name: [down_proj#1, q_proj]
      weight: {bit: 8, granularity: per_channel}
      act: {bit: 6}
    setting_1:
      layer_name: [o_proj#0]
      do_quant: False
    setting_2:
      layer_name: [gate_proj#1, up_proj#0]
      weight: {bit: 4, dtype: bitmod, group_size: 32}
    setting_3:
      layer_name: [q_proj#1]
      weight: {bit: 3, symmetric: True}
      act: {bit: 4, symmetric: False}
"""


def _w(bits, group=16, **kw):
    return QuantArgs(bits=bits, group_size=group, target="weight", **kw)


def _a(bits, symmetric=True):
    return QuantArgs(bits=bits, dtype="int", symmetric=symmetric, target="activation")


W4, A8 = _w(4), _a(8)
# (block, layer) -> (weight, input) settings, written out: None = left in full precision
BY_HAND = {
    (0, "q_proj"): (_w(8, -1), _a(6)),  # setting_0 (no '#': every block)
    (0, "k_proj"): (W4, A8), (0, "v_proj"): (W4, A8),
    (0, "o_proj"): (None, None),  # setting_1
    (0, "gate_proj"): (W4, A8),
    (0, "up_proj"): (_w(4, 32, dtype="bitmod"), None),  # setting_2: weight-only
    (0, "down_proj"): (W4, A8),
    (1, "q_proj"): (_w(3, symmetric=True), _a(4, symmetric=False)),  # setting_3 overrides setting_0
    (1, "k_proj"): (W4, A8), (1, "v_proj"): (W4, A8), (1, "o_proj"): (W4, A8),
    (1, "gate_proj"): (_w(4, 32, dtype="bitmod"), None),
    (1, "up_proj"): (W4, A8),
    (1, "down_proj"): (_w(8, -1), _a(6)),
}


def _plan(text: str, base: QuantPlan | None = None) -> QuantPlan:
    return parse_quant_config(yaml.safe_load(text), "test.yml").apply(base or QuantPlan())


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_map_equals_quantization_by_hand(tiny_models, input_ids, family):
    plan = _plan(MIXED)
    model, by_hand, uniform = tiny_models(family), tiny_models(family), tiny_models(family)
    assert {(b, s) for b, s, _, _ in block_linears(by_hand)} == set(BY_HAND)
    for block, short, _, lin in block_linears(by_hand):
        w, a = BY_HAND[block, short]
        if w is not None:
            lin.weight.copy_(fake_quantize(lin.weight, w))
        if a is not None:
            lin.register_forward_pre_hook(lambda m, inp, a=a: (fake_quantize(inp[0], a),))
    handle = attach(model, plan)
    assert attach(model, plan) is handle  # idempotent with a map
    out = model(input_ids).logits
    assert torch.equal(out, by_hand(input_ids).logits)
    attach(uniform, QuantPlan(w=W4, a=A8))
    assert not torch.allclose(out, uniform(input_ids).logits)  # the map changed the numbers
    handle.remove()
    assert torch.equal(model(input_ids).logits, tiny_models(family)(input_ids).logits)


def _block_outputs(model, input_ids, replace_input: dict | None = None) -> list[torch.Tensor]:
    """Output of every decoder block; replace_input {block: tensor} feeds that block a given input."""
    outs, hooks = [], []
    for i, block in enumerate(decoder_blocks(model)):
        hooks.append(block.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o)))
        if replace_input and i in replace_input:
            def swap(m, args, kwargs, x=replace_input[i]):
                return (x, *args[1:]), kwargs
            hooks.append(block.register_forward_pre_hook(swap, with_kwargs=True))
    with torch.no_grad():
        model(input_ids)
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_kv_bits_of_one_block(tiny_models, input_ids, impl, family):
    """k_bits / v_bits on block 1 only: block 0 is exactly full precision, block 1 exactly the KV4 attention."""
    plan = _plan("quant:\n  mix_bits:\n    kv:\n      layer_name: [k_proj#1]\n      k_bits: 4\n      v_bits: 4\n",
                 QuantPlan.from_flags(k_group_size=16, v_group_size=16))
    kv4 = QuantPlan.from_flags(k_bits=4, v_bits=4, k_group_size=16, v_group_size=16)
    assert plan.block_plan(1) == kv4 and plan.block_plan(0) == QuantPlan.from_flags(k_group_size=16, v_group_size=16)
    assert plan.quantizes_attention and not plan.is_full_precision and not plan.needs_eager
    assert plan.linear_args(1, "k_proj") == (plan.w, plan.a)  # a KV-only setting leaves the Linears alone
    fp, mixed, full = tiny_models(family, impl), tiny_models(family, impl), tiny_models(family, impl)
    attach(mixed, plan)
    attach(full, kv4)
    states = [getattr(m, STATE_ATTR).plan for m in (b.self_attn for b in decoder_blocks(mixed))]
    assert states == [plan.block_plan(0), kv4]
    h_fp, h_mixed = _block_outputs(fp, input_ids), _block_outputs(mixed, input_ids)
    assert torch.equal(h_mixed[0], h_fp[0])
    assert not torch.allclose(h_mixed[1], h_fp[1])
    h_full = _block_outputs(full, input_ids, replace_input={1: h_fp[0]})
    assert torch.equal(h_mixed[1], h_full[1])


def test_kv_off_in_one_block_of_a_kv4_model(tiny_models, input_ids):
    plan = _plan("quant:\n  mix_bits:\n    keep_first:\n      layer_name: [q_proj#0]\n      k_bits: 16\n"
                 "      v_bits: 16\n", QuantPlan.from_flags(k_bits=4, v_bits=4))
    assert not plan.block_plan(0).quantizes_attention and plan.block_plan(1).quantizes_attention
    fp, mixed = tiny_models(), tiny_models()
    attach(mixed, plan)
    assert torch.equal(_block_outputs(mixed, input_ids)[0], _block_outputs(fp, input_ids)[0])


def test_attach_refuses_a_map_past_the_depth(tiny_models):
    plan = _plan("quant:\n  weight: {bit: 4}\n  mix_bits:\n    s:\n      layer_name: [o_proj#0-2]\n"
                 "      do_quant: False\n")
    with pytest.raises(ValueError, match=r"setting 's': layer_name entry 'o_proj#0-2' names block\(s\) 2, but the "
                                         r"model has 2 blocks; allowed: 0..1"):
        attach(tiny_models(), plan)


def test_attach_checks_the_v_fold_of_every_block(tiny_models):
    plan = _plan("quant:\n  mix_bits:\n    s:\n      layer_name: [v_proj#1]\n      v_bits: 4\n",
                 QuantPlan.from_flags(p_bits=8, v_group_size=24))
    with pytest.raises(ValueError, match="--v_group_size 24 does not cover whole heads \\(head_dim 16\\)"):
        attach(tiny_models(), plan)
