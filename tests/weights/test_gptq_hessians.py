"""GPTQ's per-group Hessian pass (early-stopped forwards, shared accumulation for Linears fed the
same input) equals hooking every Linear through full block forwards, and the whole GPTQ run
equals a slow reference built that way, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.modeling.conftest import FAMILIES, build_tiny
from wkvaq_quant.arch import ARCHS
from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.modeling.attach import block_linears, decoder_blocks
from wkvaq_quant.weights.blocks import capture_block_inputs, for_each_block, run_block
from wkvaq_quant.weights.gptq import GptqConfig, HessianAccumulator, gptq_quantize, gptq_weight, \
    group_hessians


@pytest.fixture(scope="module", params=FAMILIES)
def base(request):
    return build_tiny(request.param)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(1))


def _full_forward_hessians(block, modules, inputs):
    """Reference: one accumulator per Linear, hooked through complete block forwards."""
    accs = [HessianAccumulator(m.in_features, "cpu") for m in modules]
    handles = [m.register_forward_pre_hook(a.hook) for m, a in zip(modules, accs)]
    run_block(block, inputs, "cpu")
    for h in handles:
        h.remove()
    return [a.H for a in accs]


def _linears(model, block_idx):
    return {short: m for b, short, _, m in block_linears(model) if b == block_idx}


def test_group_hessians_equal_full_forward_hessians_and_stop_early(base, ids):
    block = decoder_blocks(base)[0]
    lin = _linears(base, 0)
    inputs = capture_block_inputs(base, ids, batch_size=2)
    calls = {"mlp": 0, "o_proj": 0}
    hooks = [block.mlp.register_forward_hook(lambda *_: calls.__setitem__("mlp", calls["mlp"] + 1)),
             lin["o_proj"].register_forward_hook(lambda *_: calls.__setitem__("o_proj", calls["o_proj"] + 1))]
    try:
        for group in ARCHS["llama"].sequential:
            modules = [lin[s] for s in group]
            calls.update(mlp=0, o_proj=0)
            got = group_hessians(block, modules, inputs, "cpu")
            ran = dict(calls)
            want = _full_forward_hessians(block, modules, inputs)
            for s, g, w in zip(group, got, want):
                assert torch.equal(g, w), s
            # the forward ends at the group's last Linear: attention groups never reach the MLP,
            # and down_proj's own forward (so the MLP's end) is not run either
            assert ran["mlp"] == 0, group
            assert ran["o_proj"] == (len(inputs.hidden) if group in (("gate_proj", "up_proj"), ("down_proj",))
                                     else 0), group
    finally:
        for h in hooks:
            h.remove()


def test_unreached_linear_is_an_error(base, ids):
    block = decoder_blocks(base)[0]
    inputs = capture_block_inputs(base, ids, batch_size=2)
    stray = torch.nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="saw no inputs"):
        group_hessians(block, [_linears(base, 0)["q_proj"], stray], inputs, "cpu")


@pytest.mark.parametrize("cfg", [GptqConfig(), GptqConfig(act_order=True, static_groups=True)])
def test_gptq_quantize_equals_full_forward_reference(base, ids, cfg):
    plan = QuantPlan.from_flags(w_bits=4, w_group_size=32)
    model, ref = copy.deepcopy(base), copy.deepcopy(base)
    gptq_quantize(model, plan, ids, cfg, batch_size=2, progress=False)

    by_block = {}
    for b, short, _, m in block_linears(ref):
        by_block.setdefault(b, {})[short] = m

    def process(i, block, inputs):
        for group in ARCHS["llama"].sequential:
            modules = [by_block[i][s] for s in group]
            for s, m, H in zip(group, modules, _full_forward_hessians(block, modules, inputs)):
                m.weight.data.copy_(gptq_weight(m.weight, H, plan.linear_args(i, s)[0], cfg).weight)

    for_each_block(ref, capture_block_inputs(ref, ids, batch_size=2), process, progress=False)
    changed = 0
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), name
        changed += not torch.equal(p, dict(base.named_parameters())[name])
    assert changed == 7 * len(decoder_blocks(base))
