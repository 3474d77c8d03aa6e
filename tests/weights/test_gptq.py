"""GPTQ: error below RTN's, identity Hessian == RTN, a slow reference loop, act_order with static
groups, true-sequential Hessians, next-input modes and per-layer maps on a tiny model."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from tests.modeling.conftest import build_tiny
from wkvaq_quant.config import QuantArgs
from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.formats import get_format
from wkvaq_quant.plan import LayerMap, LayerTarget, MixSetting
from wkvaq_quant.modeling.attach import decoder_blocks
from wkvaq_quant.quantize import quantize
from wkvaq_quant.weights import gptq as gptq_mod
from wkvaq_quant.weights.blocks import capture_block_inputs, forward_block
from wkvaq_quant.weights.gptq import GptqConfig, HessianAccumulator, gptq_quantize, gptq_weight

FORMATS = [
    QuantArgs(bits=4, group_size=16),
    QuantArgs(bits=3, group_size=-1),
    QuantArgs(bits=4, group_size=24, symmetric=True),  # 64 columns: groups 24, 24, 16
    QuantArgs(bits=3, dtype="bitmod", group_size=16),
    QuantArgs(bits=4, dtype="fp4_e2m1", group_size=32),
    QuantArgs(bits=4, granularity="per_tensor"),
]


def _layer(seed: int = 0, rows: int = 32, cols: int = 64, n: int = 512):
    """A weight [rows, cols] and correlated inputs X [n, cols] (off-diagonal Hessian)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    X = torch.randn(n, cols, generator=g) @ mix * torch.linspace(0.2, 3.0, cols)
    return W, X


def _hessian(X):
    acc = HessianAccumulator(X.shape[1], "cpu")
    acc.add(X[: len(X) // 2])
    acc.add(X[len(X) // 2:].unsqueeze(0))  # any leading shape: [1, n, in]
    return acc.H


@pytest.mark.parametrize("cols", [48, 150])  # one triangle block; three, the last one partial
def test_hessian_accumulator_is_2_over_n_xtx(cols):
    X = torch.randn(300, cols, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.2, 3.0, cols)
    H = _hessian(X)
    torch.testing.assert_close(H, 2 * X.double().T @ X.double() / X.shape[0], rtol=1e-5, atol=1e-4, check_dtype=False)
    assert torch.equal(H, H.T)  # the mirrored upper triangle is the lower one exactly


@pytest.mark.parametrize("args", FORMATS, ids=lambda a: f"{a.dtype}{a.bits}g{a.group_size}{a.granularity}")
def test_gptq_output_error_below_rtn(args):
    W, X = _layer()
    Q = gptq_weight(W, _hessian(X), args).weight
    rtn = quantize(W, args).x_hat
    err_gptq = (X @ (W - Q).T).square().sum()
    err_rtn = (X @ (W - rtn).T).square().sum()
    assert err_gptq < 0.9 * err_rtn, (float(err_gptq), float(err_rtn))


@pytest.mark.parametrize("args", FORMATS, ids=lambda a: f"{a.dtype}{a.bits}g{a.group_size}{a.granularity}")
@pytest.mark.parametrize("blocksize", [128, 20])
def test_diagonal_hessian_gives_rtn_bit_for_bit(args, blocksize):
    """Without off-diagonal terms no error reaches another column: GPTQ is RTN exactly."""
    W, _ = _layer(1)
    H = torch.eye(64)
    assert torch.equal(gptq_weight(W, H, args, GptqConfig(blocksize=blocksize)).weight, quantize(W, args).x_hat)


@pytest.mark.parametrize("args", FORMATS, ids=lambda a: f"{a.dtype}{a.bits}g{a.group_size}{a.granularity}")
def test_diagonal_hessian_act_order_static_groups_gives_rtn(args):
    """Distinct diagonal entries reorder the columns; static groups keep each column's own group."""
    W, _ = _layer(2)
    H = torch.diag(torch.linspace(0.5, 4.0, 64)[torch.randperm(64, generator=torch.Generator().manual_seed(0))])
    cfg = GptqConfig(act_order=True, static_groups=True, blocksize=16)
    assert torch.equal(gptq_weight(W, H, args, cfg).weight, quantize(W, args).x_hat)


def _slow_gptq(W, H, args, percdamp=0.01):
    """The paper's algorithm without lazy batches, in float64: quantize a column, update every later
    column at once; group parameters from the updated weight when the group starts."""
    fmt = get_format(args.dtype)
    W = W.double().clone()
    H = H.double().clone()
    H += percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    Q = torch.zeros_like(W)
    gs = args.group_size
    for i in range(W.shape[1]):
        if i % gs == 0:
            qp = fmt.choose_qparams(W[:, i: i + gs].float().unsqueeze(1), args)
        out = torch.empty(W.shape[0], 1, 1)
        fmt.apply(W[:, i].float().reshape(-1, 1, 1), qp, args, out)
        Q[:, i] = out.view(-1).double()
        err = (W[:, i] - Q[:, i]) / Hinv[i, i]
        W[:, i:] -= err.unsqueeze(1) * Hinv[i, i:].unsqueeze(0)
    return Q.float()


@pytest.mark.parametrize("gs,blocksize", [(16, 128), (24, 20), (32, 8)])
def test_matches_slow_reference(gs, blocksize):
    """Lazy batches (and cutting blocks at group starts) change nothing but rounding order."""
    W, X = _layer(3)
    args = QuantArgs(bits=4, group_size=gs)
    Q = gptq_weight(W, _hessian(X), args, GptqConfig(blocksize=blocksize)).weight
    ref = _slow_gptq(W, _hessian(X), args)
    same = torch.isclose(Q, ref, rtol=0, atol=1e-4).float().mean()
    assert same > 0.99, float(same)


def test_static_groups_with_act_order_use_the_original_groups():
    W, X = _layer(4)
    H = _hessian(X)
    args = QuantArgs(bits=3, group_size=16)
    plain = gptq_weight(W, H, args, GptqConfig(static_groups=True))
    ordered = gptq_weight(W, H, args, GptqConfig(static_groups=True, act_order=True))
    rtn = quantize(W, args)
    assert len(ordered.qparams) == 4
    fmt = get_format("int")
    for g, (a, b) in enumerate(zip(plain.qparams, ordered.qparams)):
        # the same parameters with or without reordering: RTN's of the original weight's group
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
        assert torch.equal(b.scale.view(-1), rtn.scale[:, g]) and torch.equal(b.zero.view(-1), rtn.zero[:, g])
        # every column of the group lies on that group's grid, although columns ran out of order
        cols = ordered.weight[:, g * 16: (g + 1) * 16].unsqueeze(1)
        out = torch.empty_like(cols)
        fmt.apply(cols, b, args, out)
        assert torch.equal(out, cols)
    assert not torch.equal(plain.weight, ordered.weight)
    err = {k: (X @ (W - r.weight).T).square().sum() for k, r in (("plain", plain), ("ordered", ordered))}
    assert err["ordered"] < (X @ (W - rtn.x_hat).T).square().sum()


def test_act_order_without_static_groups_groups_permuted_columns():
    """Groups are runs of the permuted columns: each run lies on its own group's grid."""
    W, X = _layer(5)
    H = _hessian(X)
    args = QuantArgs(bits=4, group_size=16)
    res = gptq_weight(W, H, args, GptqConfig(act_order=True))
    perm = torch.argsort(torch.diag(H), descending=True)
    fmt = get_format("int")
    for g, qp in enumerate(res.qparams):
        cols = res.weight[:, perm[g * 16: (g + 1) * 16]].unsqueeze(1)
        out = torch.empty_like(cols)
        fmt.apply(cols, qp, args, out)
        assert torch.equal(out, cols)


def test_dead_columns_and_disabled_args():
    W, X = _layer(6)
    X[:, 5] = 0  # an input channel that is always zero: its weights do not matter and become 0
    res = gptq_weight(W, _hessian(X), QuantArgs(bits=4, group_size=16))
    assert torch.all(res.weight[:, 5] == 0)
    off = gptq_weight(W, _hessian(X), QuantArgs(bits=16))
    assert off.weight is W


@pytest.mark.parametrize("kw,msg", [
    ({"percdamp": -0.1}, "--percdamp"), ({"percdamp": 2.0}, "--percdamp"), ({"blocksize": 0}, "blocksize"),
    ({"act_order": 1}, "--act_order"), ({"next_inputs": "both"}, "--gptq_next_inputs"),
])
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        GptqConfig(**kw)


def test_double_quant_and_bad_hessian_refused():
    W, X = _layer()
    with pytest.raises(ValueError, match="double_quant"):
        gptq_weight(W, _hessian(X), QuantArgs(bits=4, group_size=16, double_quant=True))
    with pytest.raises(ValueError, match="percdamp"):
        gptq_weight(W, -torch.eye(64), QuantArgs(bits=4, group_size=16), GptqConfig(percdamp=0.0))


# ---- a tiny model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base():
    return build_tiny("llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(0))


def _plan(bits=4, gs=32, layers=None):
    return dataclasses.replace(QuantPlan.from_flags(w_bits=bits, w_group_size=gs), layers=layers)


def test_true_sequential_hessians(base, ids, monkeypatch):
    """o_proj's Hessian comes from the block with q/k/v already quantized; down_proj's from the
    block with everything before it quantized."""
    model = copy.deepcopy(base)
    seen = {}
    real = gptq_mod.gptq_weight

    def spy(weight, H, args, cfg=GptqConfig(), overwrite_H=False):
        seen.setdefault(id(weight), H.clone())
        return real(weight, H, args, cfg, overwrite_H)

    monkeypatch.setattr(gptq_mod, "gptq_weight", spy)
    gptq_quantize(model, _plan(), ids, batch_size=2, progress=False)
    b0, q0 = decoder_blocks(base)[0], decoder_blocks(model)[0]
    inputs = capture_block_inputs(base, ids, batch_size=2)

    def hessian_of(block, lin):
        acc = HessianAccumulator(lin.in_features, "cpu")
        h = lin.register_forward_pre_hook(acc.hook)
        forward_block(block, inputs, "cpu")
        h.remove()
        return acc.H

    mixed = copy.deepcopy(b0)
    for n in ("q_proj", "k_proj", "v_proj"):
        getattr(mixed.self_attn, n).weight.data.copy_(getattr(q0.self_attn, n).weight)
    got = seen[id(q0.self_attn.o_proj.weight)]
    torch.testing.assert_close(got, hessian_of(mixed, mixed.self_attn.o_proj), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, hessian_of(b0, b0.self_attn.o_proj), rtol=1e-3, atol=1e-4)
    for n in ("o_proj",):
        getattr(mixed.self_attn, n).weight.data.copy_(getattr(q0.self_attn, n).weight)
    for n in ("gate_proj", "up_proj"):
        getattr(mixed.mlp, n).weight.data.copy_(getattr(q0.mlp, n).weight)
    torch.testing.assert_close(seen[id(q0.mlp.down_proj.weight)], hessian_of(mixed, mixed.mlp.down_proj),
                               rtol=1e-4, atol=1e-5)
    # q/k/v share one Hessian: the block's (fp) input after the norm
    torch.testing.assert_close(seen[id(q0.self_attn.q_proj.weight)], seen[id(q0.self_attn.v_proj.weight)])


def test_mix_bits_disabled_layer_untouched(base, ids):
    off = MixSetting(name="keep", targets=(LayerTarget("down_proj", (0,)), LayerTarget("q_proj")), do_quant=False)
    model = copy.deepcopy(base)
    losses = gptq_quantize(model, _plan(layers=LayerMap((off,))), ids, batch_size=2, progress=False)
    for (name, p), (_, p0) in zip(model.named_parameters(), base.named_parameters()):
        kept = name.endswith(("0.mlp.down_proj.weight", "q_proj.weight")) or "proj" not in name
        assert torch.equal(p, p0) == kept, name
    assert "model.layers.0.mlp.down_proj" not in losses and "model.layers.1.mlp.down_proj" in losses
    assert len(losses) == 2 * 7 - 3


def test_next_inputs_fp_and_quantized(base, ids):
    """fp: block 1 sees the fp block 0's outputs, exactly as when block 0 is not quantized at all."""
    skip0 = LayerMap((MixSetting(name="b0", targets=tuple(LayerTarget(n, (0,)) for n in
                                                          ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj")), do_quant=False),))
    runs = {}
    for key, plan, nxt in (("fp", _plan(), "fp"), ("q", _plan(), "quantized"), ("skip0", _plan(layers=skip0), "fp")):
        m = copy.deepcopy(base)
        gptq_quantize(m, plan, ids, GptqConfig(next_inputs=nxt), batch_size=2, progress=False)
        runs[key] = decoder_blocks(m)[1].mlp.down_proj.weight
    assert torch.equal(runs["fp"], runs["skip0"])
    assert not torch.equal(runs["fp"], runs["q"])


def test_overwriting_the_hessian_gives_the_same_weights():
    """overwrite_H (GPTQ working in the Hessian's own memory) changes nothing but the caller's H."""
    g = torch.Generator().manual_seed(3)
    W, X = torch.randn(24, 40, generator=g), torch.randn(200, 40, generator=g)
    H = 2 * X.T @ X / 200
    args = QuantArgs(bits=3, group_size=8, target="weight")
    for cfg in (GptqConfig(), GptqConfig(act_order=True, static_groups=True)):
        ref = gptq_weight(W, H, args, cfg)
        H_copy = H.clone()
        got = gptq_weight(W, H_copy, args, cfg, overwrite_H=True)
        assert torch.equal(got.weight, ref.weight) and got.loss == ref.loss
        assert torch.equal(H_copy, H) == cfg.act_order  # its memory was used (act_order works on a permuted copy)
