"""AWQ search and apply on tiny random Llamas: better than RTN, exact folding, bit-exact caches,
recorded BitMoD grids, layers left unquantized."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from wkvaq_quant.weights.awq.apply import fold_scales
from wkvaq_quant.weights.awq.cache import load_cache, save_cache
from wkvaq_quant.weights.awq.pre_quant import apply_awq, run_awq
from wkvaq_quant.weights.awq.structure import scale_groups
from tests.awq.helpers import OUTLIERS, calib_ids, planted_model
from tests.modeling.conftest import FAMILIES, build_tiny
from wkvaq_quant.arch import arch_of
from wkvaq_quant.config import QuantArgs
from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.formats.bitmod import BITMOD_GRIDS
from wkvaq_quant.modeling.attach import block_linears, decoder_blocks
from wkvaq_quant.quantize import quantize
from wkvaq_quant.weights.blocks import capture_block_inputs, run_block
from wkvaq_quant.weights.rtn import rtn_quantize


def _plan(bits: int = 3, dtype: str = "int", group: int = 32) -> QuantPlan:
    return QuantPlan.from_flags(w_bits=bits, w_group_size=group, w_dtype=dtype)


def _block0_error(model, fp_model, ids) -> float:
    """Mean squared error of block 0's output against the FP model's, on the same inputs."""
    inputs = capture_block_inputs(fp_model, ids)
    ref = torch.cat(run_block(decoder_blocks(fp_model)[0], inputs, "cpu").hidden)
    out = torch.cat(run_block(decoder_blocks(model)[0], inputs, "cpu").hidden)
    return (out - ref).pow(2).mean().item()


@pytest.mark.parametrize("dtype,bits,group,search_dtype", [("int", 3, 32, "model"), ("int", 4, 32, "model"),
                                                            ("bitmod", 3, 32, "model"), ("int", 3, 48, "model"),
                                                            ("int", 3, 32, "bfloat16")])
def test_awq_beats_rtn_on_planted_outliers(dtype, bits, group, search_dtype):
    fp = planted_model()
    plan = _plan(bits, dtype, group)
    rtn = copy.deepcopy(fp)
    rtn_quantize(rtn, plan)
    awq = copy.deepcopy(fp)
    cache = run_awq(awq, plan, calib_ids(), "tiny", batch_size=8, progress=False, search_dtype=search_dtype)
    assert cache["meta"]["search"]["search_dtype"] == search_dtype
    rtn_quantize(awq, plan)
    held_out = calib_ids(4, 32, seed=123)  # not the calibration data
    e_rtn, e_awq = _block0_error(rtn, fp, held_out), _block0_error(awq, fp, held_out)
    assert e_awq < 0.7 * e_rtn, (e_awq, e_rtn)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_scale_folding_is_exact_at_full_precision():
    fp = planted_model()
    cache = run_awq(copy.deepcopy(fp), _plan(), calib_ids(), "tiny", batch_size=8, progress=False)
    assert any(not torch.equal(e["scales"], torch.ones_like(e["scales"])) for e in cache["scale"].values())
    folded = copy.deepcopy(fp)
    apply_awq(folded, {"scale": cache["scale"], "clip": {}})
    assert not torch.equal(folded.model.layers[0].input_layernorm.weight, fp.model.layers[0].input_layernorm.weight)
    ids = calib_ids(2, 32, seed=7)
    torch.testing.assert_close(_logits(folded, ids), _logits(fp, ids), rtol=1e-4, atol=1e-4)


def test_fc_to_fc_folding_without_gqa_is_exact():
    """v_proj -> o_proj is a scale group only when the widths match (no GQA); folding is exact."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    mha = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=4, head_dim=16)).eval()
    gqa = build_tiny("llama")
    assert [g.prev for g in scale_groups(gqa.model.layers[0])] == [
        "input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    groups = scale_groups(mha.model.layers[0])
    assert [g.prev for g in groups] == ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm",
                                        "mlp.up_proj"]
    ids = calib_ids(2, 16)
    before = _logits(mha, ids)
    g = torch.Generator().manual_seed(3)
    block = mha.model.layers[0]
    for grp in groups:
        lins = [block.get_submodule(n) for n in grp.layers]
        fold_scales(block.get_submodule(grp.prev), lins, torch.rand(lins[0].in_features, generator=g) * 4 + 0.25)
    torch.testing.assert_close(_logits(mha, ids), before, rtol=1e-4, atol=1e-4)


PREVS = {  # the op before each group, from the families' modeling code (Gemma-3: the MLP's own pre-norm)
    "llama": ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"],
    "gemma3": ["input_layernorm", "self_attn.v_proj", "pre_feedforward_layernorm", "mlp.up_proj"],
}


def _mha(family: str):
    """A one-block model of `family` without GQA (so v_proj -> o_proj is a group), random biases and norms."""
    from transformers import AutoModelForCausalLM

    from tests.modeling.conftest import randomize_offsets, tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, num_hidden_layers=2, num_key_value_heads=4))
    randomize_offsets(model)
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_scale_group_folds_exactly(family):
    """Random scales folded into every group's previous op leave the logits unchanged: Qwen2's q/k/v biases
    (v_proj's divided with its weight), Gemma's (1 + w) norms (w' = (1 + w) / s - 1), Gemma-3's MLP fed by
    pre_feedforward_layernorm (post_attention_layernorm normalizes o_proj's output and is not a group's prev)."""
    model = _mha(family)
    block = model.model.layers[0]
    groups = scale_groups(block)
    assert [g.prev for g in groups] == PREVS.get(family, PREVS["llama"])
    ids = calib_ids(2, 16)
    before = _logits(model, ids)
    g = torch.Generator().manual_seed(3)
    for grp in groups:
        lins = [block.get_submodule(n) for n in grp.layers]
        fold_scales(block.get_submodule(grp.prev), lins, torch.rand(lins[0].in_features, generator=g) * 4 + 0.25,
                    arch_of(block).norm_offset)
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-4, atol=1e-4)


def test_gemma_norm_fold_divides_its_output():
    """Gemma3RMSNorm(x) = x_hat * (1 + w): after the fold its output is the old one divided by s, element by
    element (w /= s would give x_hat * (1 + w / s), wrong wherever w != 0)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    g = torch.Generator().manual_seed(0)
    norm = Gemma3RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g))
    lin = torch.nn.Linear(8, 3, bias=False)
    x, s = torch.randn(5, 8, generator=g), torch.rand(8, generator=g) + 0.5
    with torch.no_grad():
        before, w0 = norm(x), norm.weight.clone()
        fold_scales(norm, [lin], s, norm_offset=1.0)
        torch.testing.assert_close(norm(x), before / s, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(norm.weight, (1 + w0) / s - 1)


def test_qwen2_v_bias_is_divided_with_its_weight():
    model = _mha("qwen2")
    attn = model.model.layers[0].self_attn
    v_bias = attn.v_proj.bias.detach().clone()
    assert v_bias.abs().min() > 0  # random, not Qwen2's zero init
    s = torch.rand(attn.o_proj.in_features, generator=torch.Generator().manual_seed(1)) + 0.5
    fold_scales(attn.v_proj, [attn.o_proj], s)
    torch.testing.assert_close(attn.v_proj.bias, v_bias / s)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma3"])
def test_search_scales_and_clips_every_family_and_the_cache_applies_bit_exactly(family):
    """run_awq on each family: the GQA models lose v_proj -> o_proj, q/k are not clipped, the saved cache
    applied to a fresh copy gives the searched weights bit for bit, and AWQ + RTN beats RTN on block 0."""
    fp = build_tiny(family)
    with torch.no_grad():  # outlier input channels, as in planted_model
        for block in decoder_blocks(fp):
            for grp in scale_groups(block)[::2]:  # the norms
                prev = block.get_submodule(grp.prev)
                prev.weight[list(OUTLIERS)] = (prev.weight[list(OUTLIERS)] + arch_of(block).norm_offset) * 30 \
                    - arch_of(block).norm_offset
    plan = _plan(3)
    searched = copy.deepcopy(fp)
    cache = run_awq(searched, plan, calib_ids(), "tiny", batch_size=8, progress=False)
    prevs = sorted({k.split(".", 3)[-1] for k in cache["scale"]})
    assert prevs == sorted(set(PREVS.get(family, PREVS["llama"])) - {"self_attn.v_proj"})
    assert cache["clip"] and not [k for k in cache["clip"] if k.endswith(("q_proj", "k_proj"))]
    applied = copy.deepcopy(fp)
    apply_awq(applied, cache)
    for (name, a), b in zip(searched.state_dict().items(), applied.state_dict().values()):
        assert torch.equal(a, b), name
    rtn = copy.deepcopy(fp)
    rtn_quantize(rtn, plan)
    rtn_quantize(searched, plan)
    ids = calib_ids(4, 32, seed=5)
    assert _block0_error(searched, fp, ids) < _block0_error(rtn, fp, ids)


@pytest.mark.parametrize("dtype", ["int", "bitmod"])
def test_dump_load_apply_is_bit_exact(tmp_path, dtype):
    fp = planted_model()
    plan = _plan(3, dtype)
    searched = copy.deepcopy(fp)
    cache = run_awq(searched, plan, calib_ids(), "tiny", batch_size=8, progress=False)
    path = save_cache(cache, tmp_path / "c" / "cache.pt")
    assert not list(path.parent.glob(".*tmp"))  # no temporary left behind
    loaded = load_cache(path)
    applied = copy.deepcopy(fp)
    apply_awq(applied, loaded)
    for (name, a), b in zip(searched.state_dict().items(), applied.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, b) for a, b in zip(fp.state_dict().values(), applied.state_dict().values()))
    rtn_quantize(searched, plan)
    rtn_quantize(applied, plan)
    for (name, a), b in zip(searched.state_dict().items(), applied.state_dict().values()):
        assert torch.equal(a, b), name


def test_bitmod_grids_recorded_and_reproducible():
    fp = planted_model()
    plan = _plan(3, "bitmod")
    cache = run_awq(copy.deepcopy(fp), plan, calib_ids(), "tiny", batch_size=8, progress=False)
    names = [name for _, _, name, _ in block_linears(fp)]
    assert sorted(cache["grid"]) == sorted(names)
    model = copy.deepcopy(fp)
    apply_awq(model, cache)
    scaled = {name: lin.weight.detach().clone() for _, _, name, lin in block_linears(model)}
    grids = rtn_quantize(model, plan)
    used = set()
    for _, _, name, lin in block_linears(model):
        assert torch.equal(grids[name], cache["grid"][name]), name
        # independent check: every dequantized group lies on scale x its recorded grid
        res = quantize(scaled[name], plan.w)
        co, ci = lin.weight.shape
        y = (lin.weight.view(co, -1, 32) / res.scale.unsqueeze(-1))
        for k in range(4):
            sel = cache["grid"][name] == k
            if sel.any():
                used.add(k)
                values = torch.tensor(BITMOD_GRIDS[3][k])
                dist = (y[sel].unsqueeze(-1) - values).abs().amin(-1)
                assert dist.max().item() < 1e-4, (name, k)
    assert len(used) >= 2  # the per-group choice actually varies


@dataclass(frozen=True)
class _PartlyOffPlan(QuantPlan):
    """A per-layer plan (as a mix_bits map gives): some Linears stay in full precision."""

    off: tuple[tuple[int, str], ...] = ()

    def linear_args(self, block: int, layer: str) -> tuple[QuantArgs, QuantArgs]:
        w, a = super().linear_args(block, layer)
        return (w.replace(bits=16) if (block, layer) in self.off else w), a


def test_layers_left_in_full_precision_are_neither_scaled_nor_clipped():
    fp = planted_model()
    base = _plan(3, "int")
    plan = _PartlyOffPlan(w=base.w, off=((0, "q_proj"), (1, "down_proj"), (0, "up_proj")))
    model = copy.deepcopy(fp)
    cache = run_awq(model, plan, calib_ids(), "tiny", batch_size=8, progress=False)
    rtn_quantize(model, plan)
    sd, sd0 = model.state_dict(), fp.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.0.mlp.up_proj.weight",  # not even divided as down_proj's previous op
                 "model.layers.0.input_layernorm.weight"):  # q_proj's group is skipped entirely
        assert torch.equal(sd[name], sd0[name]), name
    assert "model.layers.0.input_layernorm" not in cache["scale"]
    assert "model.layers.1.mlp.up_proj" not in cache["scale"]
    assert "model.layers.0.mlp.up_proj" not in cache["scale"]  # up_proj off: down_proj's group skipped
    assert "model.layers.0.post_attention_layernorm" not in cache["scale"]  # gate/up group holds up_proj
    assert "model.layers.1.mlp.down_proj" not in cache["clip"]
    assert "model.layers.1.mlp.down_proj" not in cache["grid"]
    assert "model.layers.1.input_layernorm" in cache["scale"]  # the rest is still searched
    assert not torch.equal(sd["model.layers.0.self_attn.k_proj.weight"], sd0["model.layers.0.self_attn.k_proj.weight"])
    assert cache["meta"]["layers"]["model.layers.0.self_attn.q_proj"] == "fp"


def test_recorded_inputs_follow_the_folded_scales():
    """After folding, the recorded (divided) inputs equal what the scaled block now computes;
    Linears sharing an input (q/k/v, gate/up) are divided once."""
    from wkvaq_quant.weights.awq.auto_scale import search_scale
    from wkvaq_quant.weights.awq.features import collect_features

    fp = planted_model()
    block = fp.model.layers[0]
    inputs = capture_block_inputs(fp, calib_ids(4, 16))
    lins = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    feats = collect_features(block, inputs, "cpu", lins, ["self_attn", "mlp"])
    w_args = {n: _plan().w for n in lins}
    with torch.no_grad():
        for g in scale_groups(block):
            found = search_scale(block, g, feats, w_args, n_grid=5)
            fold_scales(block.get_submodule(g.prev), [block.get_submodule(n) for n in g.layers], found.scales)
            feats.divide_inputs(g.layers, found.scales)
    fresh = collect_features(block, inputs, "cpu", lins, ["self_attn", "mlp"])
    for n in lins:
        torch.testing.assert_close(torch.cat(feats.inputs[n]), torch.cat(fresh.inputs[n]), rtol=1e-5, atol=1e-5)


def _double(obj):
    """obj with every floating tensor inside (tuples, dicts) in float64."""
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_double(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _double(v) for k, v in obj.items()}
    return obj


def _scale_losses_reference(block, group, feats, args, n_grid, a_args=None):
    """Slow reference of one scale search: per alpha, the float64 mean squared difference between
    the inspected module's output with the group's weights set to Q(W * s) / s and with the
    original weights, each from an explicit forward of a float64 copy of the block. With `a_args`
    (an activation setting), each group Linear's input x becomes Q_a(x / s) * s (llmc's search on
    quantized inputs), quantized in the model's dtype."""
    from wkvaq_quant.weights.awq.auto_scale import activation_mean
    from wkvaq_quant.quantize import fake_quantize

    ref_block = copy.deepcopy(block).double()
    current = {}
    if a_args is not None:
        for name in group.layers:
            ref_block.get_submodule(name).register_forward_pre_hook(
                lambda _m, a: ((fake_quantize((a[0] / current["s"]).float(), a_args) * current["s"]).double(),)
                if "s" in current else a)
    inspect = ref_block.get_submodule(group.inspect)
    xs = feats.inputs[group.layers[0]]
    x_mean = activation_mean(xs)

    def outputs(b, x):
        if isinstance(inspect, torch.nn.Linear):
            return inspect(x.double())
        rest, kw = feats.calls[group.inspect][b]
        out = inspect(x.double(), *_double(rest), **_double(kw))
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        fp = [outputs(b, x) for b, x in enumerate(xs)]  # full precision: no input quantized yet
        losses = []
        for r in range(n_grid):
            s = x_mean.pow(r / n_grid).clamp(min=1e-4)
            s = (s / (s.max() * s.min()).sqrt()).view(1, -1)
            current["s"] = s.double()
            for name in group.layers:
                w0 = block.get_submodule(name).weight
                ref_block.get_submodule(name).weight.copy_((fake_quantize(w0 * s, args) / s).double())
            sq = sum(float((outputs(b, x) - fp[b]).pow(2).sum()) for b, x in enumerate(xs))
            losses.append(sq / sum(f.numel() for f in fp))
    return losses


def _outlier_mha():
    """A one-block Llama without GQA (every scale group searched) whose input_layernorm has two
    outlier channels: (model, its block)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    mha = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=4, head_dim=16)).eval()
    block = mha.model.layers[0]
    with torch.no_grad():
        block.input_layernorm.weight[list(OUTLIERS[:2])] *= 30.0
    return mha, block


@pytest.mark.parametrize("n_calib,seq,search_dtype,copy_outputs",
                         [(2, 16, None, False), (8, 64, None, False), (2, 16, torch.bfloat16, False),
                          (8, 64, torch.bfloat16, False), (2, 16, torch.bfloat16, True)],
                         ids=["direct", "gram", "direct-bf16", "gram-bf16", "direct-bf16-copied-outputs"])
def test_scale_search_losses_equal_an_explicit_reference(n_calib, seq, search_dtype, copy_outputs):
    """Every group's loss per alpha (from the recorded reference outputs; o_proj / down_proj from
    the weight change alone, per batch with few tokens and through the inputs' Gram matrix with many)
    equals an explicit float64 forward of the inspected module, and the search keeps the smallest.
    With --search_dtype bfloat16 (each Linear's output change in bfloat16) the losses stay within 1%:
    both when attention / MLP return o_proj's / down_proj's output itself (the loss from that
    Linear's output change alone) and when they return a new tensor (here it plus 1: output minus
    reference)."""
    from wkvaq_quant.weights.awq.auto_scale import _LinearError, _same_tensors, search_scale
    from wkvaq_quant.weights.awq.features import collect_features

    mha, block = _outlier_mha()
    inputs = capture_block_inputs(mha, calib_ids(n_calib, seq), batch_size=2)
    if copy_outputs:  # the modules return new tensors (the float64 reference copies the hooks)
        for m in (block.self_attn, block.mlp):
            m.register_forward_hook(lambda _m, _a, o: (o[0] + 1.0, *o[1:]) if isinstance(o, tuple) else o + 1.0)
    lins = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    feats = collect_features(block, inputs, "cpu", lins, ["self_attn", "mlp"], linear_outputs=search_dtype is not None)
    if search_dtype is not None:
        for tail, module in (("self_attn.o_proj", "self_attn"), ("mlp.down_proj", "mlp")):
            assert _same_tensors(feats.linear_outputs[tail], feats.outputs[module]) != copy_outputs
    args = _plan(3, "int", 16).w
    w_args = {n: args for n in lins}
    groups = scale_groups(block)
    assert len(groups) == 4
    n_grid = 5
    gram = n_calib * seq > 200
    with torch.no_grad():
        for g in groups:
            if g.layers == (g.inspect,):
                lin = block.get_submodule(g.inspect)
                assert (_LinearError(feats.inputs[g.inspect], lin.out_features, n_grid).gram is not None) == gram
            expected = _scale_losses_reference(block, g, feats, args, n_grid)
            weights = {n: m.weight.clone() for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
            found = search_scale(block, g, feats, w_args, n_grid, search_dtype)
            for n, m in block.named_modules():  # the search leaves every module as it was
                if isinstance(m, torch.nn.Linear):
                    assert "forward" not in vars(m) and torch.equal(m.weight, weights[n]), n
            torch.testing.assert_close(torch.tensor(found.losses, dtype=torch.float64),
                                       torch.tensor(expected, dtype=torch.float64),
                                       rtol=2e-4 if search_dtype is None else 1e-2, atol=0)
            if search_dtype is None:
                assert found.alpha == int(torch.tensor(expected).argmin()) / n_grid, (g.prev, found.losses, expected)
            else:  # within the rounding of the changes: the chosen loss is the smallest up to 1%
                assert expected[round(found.alpha * n_grid)] <= min(expected) * 1.01
            fold_scales(block.get_submodule(g.prev), [block.get_submodule(n) for n in g.layers], found.scales)
            feats.divide_inputs(g.layers, found.scales)


def _clip_errors_reference(weight, x, args, n_grid, max_shrink):
    """Slow reference: per candidate i, the float64 mean over tokens of (group output of the clipped,
    quantized weight - group output of the weight)^2, from explicit outputs: [n_cand, out, n_group]."""
    from wkvaq_quant.quantize import fake_quantize

    gs = args.group_size
    ng = -(-weight.shape[1] // gs)
    w64, x64 = weight.double(), x.double()
    amax = torch.stack([weight[:, g * gs:(g + 1) * gs].abs().amax(1) for g in range(ng)], 1)
    errs = []
    for i in range(int(max_shrink * n_grid)):
        m = (amax * (1 - i / n_grid)).repeat_interleave(gs, 1)[:, :weight.shape[1]]
        q = fake_quantize(torch.maximum(torch.minimum(weight, m), -m), args).double()
        per_group = []
        for g in range(ng):
            sl = slice(g * gs, (g + 1) * gs)
            per_group.append((x64[:, sl] @ q[:, sl].T - x64[:, sl] @ w64[:, sl].T).pow(2).mean(0))
        errs.append(torch.stack(per_group, 1))
    return torch.stack(errs), amax


@pytest.mark.parametrize("args", [QuantArgs(bits=3, group_size=32), QuantArgs(bits=4, group_size=24),
                                  QuantArgs(bits=3, dtype="bitmod", group_size=32)],
                         ids=["int3g32", "int4g24-partial", "bitmod3g32"])
def test_clip_search_picks_the_reference_best_candidate(args):
    """search_clip (Gram-matrix errors) picks, per (row, group), a candidate whose error under the
    slow explicit-output reference is the smallest (up to float32 rounding), and really clips some."""
    from wkvaq_quant.weights.awq.auto_clip import search_clip

    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 88, generator=g)
    w[torch.rand(40, 88, generator=g) < 0.03] *= 8  # outliers: clipping them pays
    x = torch.randn(300, 88, generator=g) * torch.linspace(0.3, 2.0, 88)
    n_grid, max_shrink = 20, 0.5
    got = search_clip(w, [x[:100], x[100:]], args, n_grid, max_shrink, n_sample_token=1000, oc_batch=16)
    errs, amax = _clip_errors_reference(w, x, args, n_grid, max_shrink)
    cand = torch.stack([amax * (1 - i / n_grid) for i in range(errs.shape[0])])  # [n_cand, out, n_group]
    chosen = (cand == got.unsqueeze(0)).double().argmax(0)
    assert ((cand == got.unsqueeze(0)).sum(0) >= 1).all()  # every value is one of the candidates
    err_chosen = errs.gather(0, chosen.unsqueeze(0))[0]
    best = errs.min(0).values
    assert (err_chosen <= best * (1 + 1e-4) + 1e-9).all()
    assert (chosen > 0).float().mean() > 0.2  # a real search: many groups are clipped


@pytest.mark.parametrize("a_dtype,a_bits", [("int", 4), ("fp8_e4m3", 8)], ids=["a4-int", "a8-fp8"])
def test_activation_aware_scale_search_equals_an_explicit_reference(a_dtype, a_bits):
    """llmc's Awq with an act section: with the inputs quantized, every group's loss per alpha equals
    an explicit float64 forward whose group Linears see Q_a(x / s), and it differs from the
    weight-only search's losses."""
    from wkvaq_quant.weights.awq.auto_scale import search_scale
    from wkvaq_quant.weights.awq.features import collect_features

    mha, block = _outlier_mha()
    inputs = capture_block_inputs(mha, calib_ids(2, 16), batch_size=2)
    lins = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    feats = collect_features(block, inputs, "cpu", lins, ["self_attn", "mlp"])
    args = _plan(3, "int", 16).w
    a_args = QuantPlan.from_flags(a_bits=a_bits, a_dtype=a_dtype).a
    n_grid = 5
    with torch.no_grad():
        for g in scale_groups(block):
            expected = _scale_losses_reference(block, g, feats, args, n_grid, a_args)
            plain = search_scale(block, g, feats, {n: args for n in lins}, n_grid)
            found = search_scale(block, g, feats, {n: args for n in lins}, n_grid, a_args={n: a_args for n in lins})
            torch.testing.assert_close(torch.tensor(found.losses, dtype=torch.float64),
                                       torch.tensor(expected, dtype=torch.float64), rtol=2e-4, atol=0)
            assert found.alpha == int(torch.tensor(expected).argmin()) / n_grid
            assert found.losses != plain.losses
            assert all(h == {} for h in (block.get_submodule(n)._forward_pre_hooks for n in g.layers))
            fold_scales(block.get_submodule(g.prev), [block.get_submodule(n) for n in g.layers], found.scales)
            feats.divide_inputs(g.layers, found.scales)


def test_activation_aware_clip_search_against_explicit_outputs():
    """With a quantized input, each clip candidate's error is the mean over tokens of
    (Q_a(x)_g . q_g - x_g . w_g)^2 per (row, group), from explicit outputs."""
    from wkvaq_quant.weights.awq.auto_clip import _sample_tokens, search_clip
    from wkvaq_quant.quantize import fake_quantize

    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, 64, generator=g)
    xs = [torch.randn(2, 40, 64, generator=g) * torch.linspace(0.2, 4, 64)]
    args = _plan(3, "int", 16).w
    a_args = QuantPlan.from_flags(a_bits=4, a_dtype="int").a
    n_grid, shrink = 10, 0.5
    got = search_clip(w, xs, args, n_grid, shrink, n_sample_token=64, a_args=a_args)
    x = _sample_tokens([t.reshape(-1, 64) for t in xs], 64)
    xq = fake_quantize(x, a_args)
    org_max = w.view(8, 4, 16).abs().amax(-1)
    best = torch.full((8, 4), float("inf"))
    want = org_max.clone()
    for i in range(int(shrink * n_grid)):
        m = (org_max * (1 - i / n_grid)).unsqueeze(-1)
        q = fake_quantize(torch.max(torch.min(w.view(8, 4, 16), m), -m).view(8, 64), args).view(8, 4, 16)
        for r in range(8):
            for gi in range(4):
                cols = slice(gi * 16, gi * 16 + 16)
                err = ((xq[:, cols].double() @ q[r, gi].double() - x[:, cols].double() @ w[r, cols].double()) ** 2).mean()
                if err < best[r, gi]:
                    best[r, gi], want[r, gi] = err, m[r, gi, 0]
    torch.testing.assert_close(got, want)
    assert not torch.equal(got, search_clip(w, xs, args, n_grid, shrink, n_sample_token=64))  # the inputs matter
