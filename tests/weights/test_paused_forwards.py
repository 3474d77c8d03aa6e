"""PausedForwards (one thread per calibration batch, paused at a module's input) equals plain
forwards, runs one batch at a time in batch order, and unwinds cleanly; GPTQ's single pass built
on it gives the per-group passes' weights bit for bit with one block forward per batch."""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch

from tests.modeling.conftest import FAMILIES, build_tiny
from wkvaq_quant.plan import LayerMap, LayerTarget, MixSetting, QuantPlan
from wkvaq_quant.modeling.attach import block_linears, decoder_blocks
from wkvaq_quant.weights.blocks import BlockInputs, PausedForwards, capture_block_inputs, run_block
from wkvaq_quant.weights.gptq import GptqConfig, gptq_block, gptq_quantize

PLAN = QuantPlan.from_flags(w_bits=3, w_group_size=16)


@pytest.fixture(scope="module", params=FAMILIES)
def base(request):
    return build_tiny(request.param)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(3))


def _inputs_seen(block, module, inputs):
    """Reference: each batch's input to `module` in a plain forward."""
    seen = []
    h = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    run_block(block, inputs, "cpu")
    h.remove()
    return seen


def test_run_to_and_finish_equal_plain_forwards_one_batch_at_a_time(base, ids):
    block = decoder_blocks(base)[0]
    inputs = capture_block_inputs(base, ids, batch_size=1)
    o_proj, down = block.self_attn.o_proj, block.mlp.down_proj
    want_o, want_down = _inputs_seen(block, o_proj, inputs), _inputs_seen(block, down, inputs)
    want_out = [h.clone() for h in run_block(block, inputs, "cpu").hidden]
    running, order, overlap = set(), [], []

    def enter(_m, args):  # every Linear call: which batch, and whether another batch runs meanwhile
        b = runner.batch
        if b is not None:
            order.append(b)
            if running - {threading.get_ident()}:
                overlap.append(b)

    starts = [block.register_forward_pre_hook(lambda _m, _a: running.add(threading.get_ident())),
              block.register_forward_hook(lambda _m, _a, _o: running.discard(threading.get_ident()))]
    calls = [m.register_forward_pre_hook(enter) for m in block.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with PausedForwards(block, inputs, "cpu") as runner:
            got_o = runner.run_to(o_proj)
            assert all(torch.equal(g, w) for g, w in zip(got_o, want_o))
            got_down = runner.run_to(down)
            assert all(torch.equal(g, w) for g, w in zip(got_down, want_down))
            outs = runner.finish()
    finally:
        for h in starts + calls:
            h.remove()
    assert len(outs) == len(want_out) and all(torch.equal(g, w) for g, w in zip(outs, want_out))
    n = len(inputs.hidden)
    # Linear calls (each recorded on entry, before the pause): q/k/v/o up to the first stop, then
    # gate/up/down up to the second; finish only completes down_proj's call. Batch order each time.
    assert order == [b for b in range(n) for _ in range(4)] + [b for b in range(n) for _ in range(3)]
    assert not [t for t in runner._threads if t.is_alive()]
    assert not o_proj._forward_pre_hooks and not down._forward_pre_hooks


def test_closing_early_unwinds_and_errors_reach_the_caller(base, ids):
    block = decoder_blocks(base)[0]
    inputs = capture_block_inputs(base, ids, batch_size=2)
    with PausedForwards(block, inputs, "cpu") as runner:
        runner.run_to(block.mlp.up_proj)
    assert not [t for t in runner._threads if t.is_alive()]
    with pytest.raises(RuntimeError, match="ended without calling Linear"):
        with PausedForwards(block, inputs, "cpu") as runner:
            runner.run_to(torch.nn.Linear(2, 2))
    assert not [t for t in runner._threads if t.is_alive()]

    def boom(_m, _a):
        raise ValueError("planted")

    h = block.mlp.gate_proj.register_forward_pre_hook(boom)
    try:
        with pytest.raises(ValueError, match="planted"):
            with PausedForwards(block, inputs, "cpu") as runner:
                runner.run_to(block.self_attn.o_proj)
                runner.finish()
    finally:
        h.remove()
    assert not [t for t in runner._threads if t.is_alive()]
    offloaded = BlockInputs(list(inputs.hidden), inputs.kwargs, inputs.store_device, offload_dir=inputs.store_device)
    with pytest.raises(ValueError, match="offloaded"):
        PausedForwards(block, offloaded, "cpu")


OFF = LayerMap((MixSetting(name="keep", targets=(LayerTarget("q_proj", (0,)), LayerTarget("gate_proj", (1,))),
                           do_quant=False),))


@pytest.mark.parametrize("cfg,plan", [
    (GptqConfig(), PLAN),
    (GptqConfig(act_order=True, static_groups=True), PLAN),
    (GptqConfig(next_inputs="fp"), PLAN),
    (GptqConfig(), dataclasses.replace(PLAN, layers=OFF)),
], ids=["default", "ao-sg", "fp-inputs", "mix-bits"])
def test_single_pass_equals_per_group_passes(base, ids, cfg, plan):
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    calls = {id(a): 0, id(b): 0}

    def count(model):
        def hook(_m, _a):
            calls[id(model)] += 1
        return [blk.self_attn.q_proj.register_forward_pre_hook(hook) for blk in decoder_blocks(model)]

    hooks = count(a) + count(b)
    la = gptq_quantize(a, plan, ids, cfg, batch_size=1, progress=False)
    lb = gptq_quantize(b, plan, ids, dataclasses.replace(cfg, single_pass=True), batch_size=1, progress=False)
    for h in hooks:
        h.remove()
    assert la == lb
    changed = 0
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        changed += not torch.equal(p, dict(base.named_parameters())[name])
    assert changed == 7 * len(decoder_blocks(base)) - (2 if plan.layers is not None else 0)
    # q_proj runs once per batch and block in the single pass ("fp" adds the full-precision forward
    # for the next block's inputs); the per-group passes run it again for every later group
    per_block = ids.shape[0] * (2 if cfg.next_inputs == "fp" else 1)
    assert calls[id(b)] == per_block * len(decoder_blocks(base))
    assert calls[id(a)] >= calls[id(b)] + 3 * ids.shape[0] * len(decoder_blocks(base))


def test_single_pass_returns_the_quantized_block_outputs(base, ids):
    model = copy.deepcopy(base)
    block = decoder_blocks(model)[0]
    inputs = capture_block_inputs(model, ids, batch_size=2)
    lins = [(s, m) for b, s, _, m in block_linears(model) if b == 0]
    res = gptq_block(block, 0, lins, inputs, PLAN, GptqConfig(single_pass=True), "cpu")
    assert res.outputs is not None and len(res.losses) == 7
    want = run_block(block, inputs, "cpu")
    assert all(torch.equal(g, w) for g, w in zip(res.outputs.hidden, want.hidden))
    assert gptq_block(block, 0, lins, inputs, PLAN, GptqConfig(), "cpu").outputs is None


def test_single_pass_refuses_a_group_that_does_not_share_its_input(base, ids):
    model = copy.deepcopy(base)
    block = decoder_blocks(model)[0]
    inputs = capture_block_inputs(model, ids, batch_size=2)
    lins = [(s, m) for b, s, _, m in block_linears(model) if b == 0]
    h = block.self_attn.k_proj.register_forward_pre_hook(lambda _m, args: (args[0] * 1.0,))  # a new tensor
    try:
        with pytest.raises(RuntimeError, match="--gptq_single_pass: k_proj of block 0 is not called right after"):
            gptq_block(block, 0, lins, inputs, PLAN, GptqConfig(single_pass=True), "cpu")
    finally:
        h.remove()
