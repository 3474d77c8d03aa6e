"""Q / K / V / P quantization against a slow reference attention written here.

The reference loops over batch, heads and tokens, quantizes every vector with its own small
quantizers (asymmetric INT with P3-LLM's integer zero point, or KIVI's float one; FP8 through
torch's float8 dtype; E4M4 / E5M7 by explicit rounding) and is selected through transformers'
AttentionInterface under its own name; pre-RoPE keys get their own hook, on k_proj, or on
k_norm for Qwen3 / Gemma-3 (written here from their modeling code, not read from the registry). As in P3-LLM,
against a residual (full-precision) token the query, key, P and value all stay full precision.
Logits of the attached model must match within ATOL.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.modeling import attach, find_attention_modules

ATOL = 1e-5  # logits; the reference sums in another order, quantization codes agree
REF = "wkvaq_test_reference"
FLOOR = 2.0**-126


# -- reference quantizers (one vector at a time) ----------------------------------------------
def ref_int(x: torch.Tensor, bits: int, zero_point: str = "float") -> torch.Tensor:
    """Asymmetric INT: the group minimum as zero point (KIVI, "float"), or P3-LLM's integer one,
    z = clamp(round(-min / s), 0, qmax), x_hat = (clamp(round(x / s) + z, 0, qmax) - z) * s."""
    qmax = 2**bits - 1
    mn, mx = x.min(), x.max()
    s = torch.clamp((mx - mn) / qmax, min=FLOOR)
    if zero_point == "float":
        return torch.clamp(torch.round((x - mn) / s), 0, qmax) * s + mn
    z = torch.clamp(torch.round(-mn / s), 0, qmax)
    return (torch.clamp(torch.round(x / s) + z, 0, qmax) - z) * s


def ref_fp8(x: torch.Tensor) -> torch.Tensor:
    s = torch.clamp(x.abs().max() / 448, min=FLOOR)
    return (x / s).to(torch.float8_e4m3fn).float() * s


def ref_groups(x: torch.Tensor, group_size: int, fn) -> torch.Tensor:
    gs = x.numel() if group_size == -1 else group_size
    return torch.cat([fn(x[i : i + gs]) for i in range(0, x.numel(), gs)])


def ref_ufloat(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned minifloat (8: E4M4 bias 15, 12: E5M7 bias 31), round half up, element by element."""
    exp_bits, man_bits = {8: (4, 4), 12: (5, 7)}[bits]
    emin = 2 - 2**exp_bits
    e = torch.floor(torch.log2(p.clamp_min(2.0**-149))).clamp_min(emin)  # binade (subnormals: emin)
    step = torch.exp2(e - man_bits)
    return torch.clamp(torch.floor(p / step + 0.5) * step, max=2 - 2.0**-man_bits)


def ref_keys(k: torch.Tensor, plan: QuantPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of one sequence, tokens layout [T, C] -> (K', s) with K' * s ~ K."""
    kv, T = plan.kv, k.shape[0]
    tq = max(T - kv.residual_len, 0)
    mu = k.mean(0) if kv.k_bias else torch.zeros(k.shape[1])
    s = torch.ones(k.shape[1])
    if kv.k_scale:  # with the k-bias P3-LLM's max |K - mu| ** 0.6
        s = ((k - mu).abs().amax(0) ** 0.6 if kv.k_bias else k.abs().amax(0)).clamp_min(FLOOR)
    out = k / s
    if plan.k.enabled:
        x = (k - mu) / s if kv.k_bias else k / s
        if kv.method == "KTVT":
            for t in range(tq):
                out[t] = ref_groups(x[t], plan.k.group_size, lambda g: ref_int(g, plan.k.bits, plan.k.zero_point)) \
                    + mu / s
        else:  # KCVT: per channel, groups of k_group_size tokens
            gs = tq if plan.k.group_size == -1 else plan.k.group_size
            for c in range(k.shape[1]):
                for t0 in range(0, tq, gs):
                    out[t0 : min(t0 + gs, tq), c] = ref_int(x[t0 : min(t0 + gs, tq), c], plan.k.bits)
    return out, s


def ref_values(v: torch.Tensor, plan: QuantPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of one sequence [T, C] -> (V_hat, scale of each element's group; 1 on the residual)."""
    out, scale = v.clone(), torch.ones_like(v)
    if plan.v.enabled:
        qmax = 2**plan.v.bits - 1
        for t in range(max(v.shape[0] - plan.kv.residual_len, 0)):
            out[t] = ref_groups(v[t], plan.v.group_size, lambda g: ref_int(g, plan.v.bits, plan.v.zero_point))
            scale[t] = ref_groups(v[t], plan.v.group_size,
                                  lambda g: torch.clamp((g.max() - g.min()) / qmax, min=FLOOR).expand(g.numel()))
    return out, scale


def ref_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    plan: QuantPlan = module.ref_plan
    per_query = plan.kv.residual_mode == "per_query" and plan.kv.residual_len > 0
    all_q = dataclasses.replace(plan, kv=dataclasses.replace(plan.kv, residual_len=0))
    R = plan.kv.residual_len
    B, H, Tq, d = query.shape
    Hkv, T = key.shape[1], key.shape[2]
    out = torch.zeros(B, Tq, H, d)
    for b in range(B):
        k_raw = key[b].transpose(0, 1).reshape(T, Hkv * d)  # [Hkv, T, d] -> [T, Hkv*d]
        v_raw = value[b].transpose(0, 1).reshape(T, Hkv * d)
        k_tok, v_tok, v_scale, s = k_raw, *ref_values(v_raw, plan), torch.ones(Hkv * d)
        if plan.kv.k_post_rope:
            k_tok, s = ref_keys(k_raw, plan)
        if per_query:  # every token quantized; the recent ones are picked per query below
            (k_tok, s), (v_tok, v_scale) = ref_keys(k_raw, all_q), ref_values(v_raw, all_q)
        for h in range(H):
            ch = slice((h // (H // Hkv)) * d, (h // (H // Hkv) + 1) * d)  # this head's KV channels
            for i in range(Tq):
                pos = T - Tq + i
                if per_query:  # token j is full precision for this query while its (KCVT: group's) end is recent
                    g = plan.k.group_size if plan.kv.method == "KCVT" and plan.k.enabled else 1
                    recent = [((j // g + 1) * g - 1 if g > 0 else j) > pos - R for j in range(T)]
                else:  # the last R tokens, for every query
                    recent = [j >= T - R for j in range(T)]
                q_raw = query[b, h, i]
                q = q_raw * s[ch] if plan.kv.k_scale and plan.kv.k_post_rope else q_raw
                if plan.q.enabled:
                    q = ref_groups(q, plan.q.group_size, ref_fp8)
                # recent tokens: full-precision query and key; the others: quantized ones
                scores = torch.stack([torch.dot(q_raw, k_raw[j, ch]) if recent[j] else torch.dot(q, k_tok[j, ch])
                                      for j in range(T)]) * scaling
                if attention_mask is not None:
                    scores = scores + attention_mask[b, 0, i]
                p = torch.softmax(scores, dim=-1)
                fold = plan.p.enabled and plan.v.enabled and plan.kv.fold_v_scale  # Q(P * s_v) . (V_hat / s_v)
                acc = torch.zeros(d)
                for j in range(T):
                    if recent[j]:  # P unquantized against the full-precision value
                        acc += p[j] * v_raw[j, ch]
                        continue
                    s_v = v_scale[j, ch.start] if fold else 1.0
                    pj = ref_ufloat(p[j] * s_v, plan.p.bits) if plan.p.enabled else p[j]
                    acc += pj * (v_tok[j, ch] / s_v)
                out[b, i, h] = acc
    return out, None


def _ref_pre_rope_keys(out: torch.Tensor, plan: QuantPlan) -> torch.Tensor:
    """Pre-RoPE keys [B, T, C], one sequence at a time."""
    return torch.stack([torch.mul(*ref_keys(out[b], plan)) for b in range(out.shape[0])])


# where each family makes its key before RoPE, and how that output is laid out
PRE_ROPE_TAPS = {
    "LlamaForCausalLM": ("k_proj", lambda out, plan: _ref_pre_rope_keys(out, plan)),
    "MistralForCausalLM": ("k_proj", lambda out, plan: _ref_pre_rope_keys(out, plan)),
    "Qwen2ForCausalLM": ("k_proj", lambda out, plan: _ref_pre_rope_keys(out, plan)),
    # k_norm(k_proj(x).view(B, T, Hkv, d)), transposed afterwards
    "Qwen3ForCausalLM": ("k_norm", lambda out, plan: _ref_pre_rope_keys(out.flatten(2), plan).view(out.shape)),
    # k_norm(k_proj(x).view(B, T, Hkv, d).transpose(1, 2)): [B, Hkv, T, d]
    "Gemma3ForCausalLM": ("k_norm", lambda out, plan: _ref_pre_rope_keys(out.transpose(1, 2).flatten(2), plan)
                          .view(out.shape[0], out.shape[2], out.shape[1], -1).transpose(1, 2)),
}


def _reference_model(model, plan: QuantPlan):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(REF, ref_attention)
    AttentionMaskInterface.register(REF, eager_mask)
    tap, ref = PRE_ROPE_TAPS[type(model).__name__]
    for m in find_attention_modules(model):
        m.ref_plan = plan
        if not plan.kv.k_post_rope and (plan.k.enabled or plan.kv.k_scale or plan.kv.k_bias):
            m.get_submodule(tap).register_forward_hook(lambda _mod, _inp, out: ref(out, plan))
    model.set_attn_implementation(REF)
    return model


F = QuantPlan.from_flags
CASES = {
    "KTVT-k4v4-row-postrope": F(k_bits=4, v_bits=4, k_quant_post_rope=True),
    "KTVT-k4v4-headdim-prerope": F(k_bits=4, v_bits=4, k_group_size=16, v_group_size=16),
    "KTVT-k3v2-g8-residual5-postrope": F(k_bits=3, v_bits=2, k_group_size=8, v_group_size=8, kv_residual_len=5,
                                         k_quant_post_rope=True),
    "KTVT-residual5-prerope": F(k_bits=2, v_bits=3, kv_residual_len=5),
    "KCVT-k4g8-prerope": F(k_bits=4, v_bits=4, k_group_size=8, kv_quant_method="KCVT"),
    "KCVT-k2g4-residual8-postrope": F(k_bits=2, v_bits=4, k_group_size=4, kv_quant_method="KCVT",
                                      kv_residual_len=8, k_quant_post_rope=True),
    "q8": F(q_bits=8),
    "q8g8-k4": F(q_bits=8, q_group_size=8, k_bits=4, k_quant_post_rope=True),
    "kscale-postrope-q8": F(k_bits=3, q_bits=8, apply_k_scale=True, k_quant_post_rope=True),
    "kscale-prerope": F(k_bits=3, v_bits=4, apply_k_scale=True),
    "kbias-postrope": F(k_bits=3, apply_k_bias=True, k_quant_post_rope=True),
    "kbias-prerope": F(k_bits=3, apply_k_bias=True),
    "kscale-kbias-residual-postrope-q8": F(k_bits=2, q_bits=8, apply_k_scale=True, apply_k_bias=True,
                                           kv_residual_len=3, k_quant_post_rope=True),
    "p8": F(p_bits=8),
    "p12-k4v4-fold": F(p_bits=12, k_bits=4, v_bits=4),
    "p8-v4-fold-row-residual3": F(p_bits=8, v_bits=4, kv_residual_len=3),
    "p8-v3-fold-headdim": F(p_bits=8, v_bits=3, v_group_size=16),
    "p8-v3-nofold": F(p_bits=8, v_bits=3, v_group_size=8, fold_v_scale=False),
    "perquery-KTVT-r5-postrope-q8": F(k_bits=3, v_bits=3, q_bits=8, kv_residual_len=5, kv_residual_mode="per_query",
                                      k_quant_post_rope=True),
    "perquery-KCVT-g4-r8-postrope": F(k_bits=2, v_bits=3, k_group_size=4, kv_quant_method="KCVT", kv_residual_len=8,
                                      kv_residual_mode="per_query", k_quant_post_rope=True),
    "perquery-kscale-kbias-p8-fold-r3": F(k_bits=3, v_bits=4, p_bits=8, apply_k_scale=True, apply_k_bias=True,
                                          kv_residual_len=3, kv_residual_mode="per_query", k_quant_post_rope=True),
    "perquery-v-only-prerope-r4": F(v_bits=2, kv_residual_len=4, kv_residual_mode="per_query"),
    "KTVT-k4v4-g8-residual3-postrope-q8-eager": F(k_bits=4, v_bits=4, k_group_size=8, q_bits=8, kv_residual_len=3,
                                                  k_quant_post_rope=True),
    "kscale-kbias-prerope-eager": F(k_bits=3, v_bits=3, apply_k_scale=True, apply_k_bias=True),
    "KTVT-k3v3-floatzp-residual2-postrope": F(k_bits=3, v_bits=3, kv_zero_point="float", kv_residual_len=2,
                                              k_quant_post_rope=True),
    "KTVT-k4v4-residual1-prerope-q8-p8": F(k_bits=4, v_bits=4, q_bits=8, p_bits=8, kv_residual_len=1),
}


FAMILY_CASES = ["KTVT-k4v4-row-postrope", "KTVT-k4v4-headdim-prerope", "KTVT-k3v2-g8-residual5-postrope",
                "KTVT-residual5-prerope", "KCVT-k4g8-prerope", "KCVT-k2g4-residual8-postrope", "q8g8-k4",
                "kscale-prerope", "kbias-prerope", "kscale-kbias-residual-postrope-q8", "p8-v4-fold-row-residual3",
                "perquery-kscale-kbias-p8-fold-r3", "kscale-kbias-prerope-eager", "KTVT-k4v4-residual1-prerope-q8-p8"]
"""The cases every other family runs too (Qwen2: biases, window on layer 1 for pre-RoPE cases; Qwen3: k_norm;
Gemma-3: k_norm in the heads layout, head_dim 32 with 1 KV head, query_pre_attn_scalar, sliding layer 0)."""
PARAMS = [("llama", n) for n in CASES] + [(f, n) for f in ("qwen2", "qwen3", "gemma3") for n in FAMILY_CASES]


@pytest.mark.parametrize("family,name", PARAMS)
def test_matches_reference(tiny_models, input_ids, family, name):
    plan = CASES[name]
    arch, window = family, None
    if "prerope" in name and family in ("llama", "qwen2"):  # Mistral: sliding window 8; Qwen2: on layer 1
        arch, window = ("mistral" if family == "llama" else family), 8
    impl = "eager" if name.endswith("-eager") else "sdpa"  # the model's own attention before attaching
    model = tiny_models(arch, impl, window)
    reference = _reference_model(tiny_models(arch, impl, window), plan)
    attach(model, plan)
    with torch.no_grad():
        got, want = model(input_ids).logits, reference(input_ids).logits
        fp = tiny_models(arch, "sdpa", window)(input_ids).logits
    assert (got - fp).abs().max() > 10 * ATOL  # the setting does change the numbers
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("flags", [dict(apply_k_scale=True), dict(apply_k_bias=True),
                                   dict(apply_k_scale=True, apply_k_bias=True, kv_residual_len=4)])
@pytest.mark.parametrize("post_rope", [False, True])
def test_k_scale_and_bias_with_16_bit_keys_leave_logits_unchanged(tiny_models, input_ids, flags, post_rope):
    model = tiny_models()
    with torch.no_grad():
        fp = model(input_ids).logits
        attach(model, F(**flags, k_quant_post_rope=post_rope))
        torch.testing.assert_close(model(input_ids).logits, fp, rtol=0, atol=1e-5)


def test_fold_needs_whole_heads_in_a_v_group(tiny_models):
    with pytest.raises(ValueError, match="--v_group_size 8 does not cover whole heads .*--no_fold_v_scale"):
        attach(tiny_models(), F(p_bits=8, v_bits=4, v_group_size=8))


def test_k_scale_with_k_bias_is_p3llms_softened_scale():
    """max over tokens of |K - mu| ** 0.6 per channel, mu the channel mean (P3-LLM's formula)."""
    from wkvaq_quant.modeling.kv import key_stats

    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 7, 12, generator=g) * 3
    s, mu = key_stats(k, F(k_bits=4, apply_k_scale=True, apply_k_bias=True))
    for b in range(2):
        for c in range(12):
            m = sum(k[b, t, c].item() for t in range(7)) / 7
            want = max(abs(k[b, t, c].item() - m) for t in range(7)) ** 0.6
            assert abs(mu[b, 0, c].item() - m) < 1e-5 and abs(s[b, 0, c].item() - want) < 1e-5
    s_only, _ = key_stats(k, F(k_bits=4, apply_k_scale=True))
    torch.testing.assert_close(s_only, k.abs().amax(dim=1, keepdim=True))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ktvt_integer_zero_point_against_a_slow_loop(bits):
    """The default KTVT key / value format: P3-LLM's integer zero point, element by element."""
    from wkvaq_quant.quantize import fake_quantize

    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 32, generator=g) + 0.7  # [B, T, C], per token, groups of 8
    plan = F(k_bits=bits, v_bits=bits, k_group_size=8, v_group_size=8)
    assert plan.k.zero_point == "int" and plan.v.zero_point == "int"
    got = fake_quantize(x, plan.k)
    qmax = 2**bits - 1
    for b in range(3):
        for t in range(5):
            for g0 in range(0, 32, 8):
                grp = [x[b, t, c].item() for c in range(g0, g0 + 8)]
                sc = max((max(grp) - min(grp)) / qmax, FLOOR)
                z = min(max(round(-min(grp) / sc), 0), qmax)
                for c, v in zip(range(g0, g0 + 8), grp):
                    want = (min(max(round(v / sc) + z, 0), qmax) - z) * sc
                    assert abs(got[b, t, c].item() - want) < 1e-5
    torch.testing.assert_close(fake_quantize(x, plan.v), got)
