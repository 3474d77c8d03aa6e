"""QuantPlan / KVArgs: P3-LLM flags map to QuantArgs; refused combinations name the flag."""

import pytest

from wkvaq_quant.config import KVArgs, QuantArgs

from wkvaq_quant.plan import QuantPlan


def test_defaults_are_full_precision():
    plan = QuantPlan()
    assert plan.is_full_precision and plan.slug() == "fp"
    assert QuantPlan.from_flags() == plan


def test_flags_map_to_quant_args():
    plan = QuantPlan.from_flags(w_bits=4, w_group_size=128, w_dtype="bitmod", a_bits=8, q_bits=8, k_bits=4,
                                v_bits=4, k_group_size=16, kv_residual_len=32, apply_k_scale=True, p_bits=8)
    assert plan.w == QuantArgs(bits=4, dtype="bitmod", group_size=128)
    assert plan.a == QuantArgs(bits=8, dtype="fp8_e4m3", target="activation")
    assert plan.q.granularity == "per_token" and plan.q.dtype == "fp8_e4m3"
    assert plan.k.granularity == "per_token" and plan.k.zero_point == "int" and plan.k.group_size == 16  # P3-LLM
    assert plan.v.zero_point == "int" and QuantPlan.from_flags(k_bits=4, kv_zero_point="float").k.zero_point == "float"
    assert QuantPlan.from_flags(k_bits=4, k_group_size=8, kv_quant_method="KCVT").k.zero_point == "float"  # KIVI
    assert plan.p.dtype == "ufloat"
    assert plan.kv == KVArgs(residual_len=32, k_scale=True)
    assert plan.slug() == "w4g128bitmod-a8fp8-q8-k4g16v4-KTVT-r32-kscale-p8"
    kcvt = QuantPlan.from_flags(k_bits=2, v_bits=2, k_group_size=32, kv_quant_method="KCVT", kv_residual_len=64)
    assert kcvt.k.granularity == "per_channel" and kcvt.v.granularity == "per_token"
    assert kcvt.slug() == "k2g32v2-KCVT-r64"


@pytest.mark.parametrize(
    "flags, match",
    [
        (dict(kv_quant_method="KCVT", apply_k_scale=True), "--apply_k_scale cannot be combined with --kv_quant_method KCVT"),
        (dict(kv_quant_method="KCVT", apply_k_bias=True), "--apply_k_bias cannot be combined with --kv_quant_method KCVT"),
        (dict(kv_quant_method="KCVT", k_bits=4, k_group_size=32, kv_residual_len=48),
         "--kv_residual_len 48 .* multiple of --k_group_size 32"),
        (dict(kv_quant_method="KCVT", k_bits=4, kv_residual_len=32), "needs a token group"),
        (dict(kv_quant_method="KIVI"), "--kv_quant_method 'KIVI': .*allowed: 'KTVT', 'KCVT'"),
        (dict(kv_residual_len=-1), "--kv_residual_len -1"),
        (dict(w_dtype="nf4", w_bits=4), "--w_dtype 'nf4'.*allowed: 'int', 'bitmod', 'fp4_e2m1'"),
        (dict(a_dtype="bitmod", a_bits=4), "--a_dtype 'bitmod'.*allowed: 'fp8_e4m3', 'int'"),
        (dict(a_bits=4), "--a_bits 4: .*allowed: 8"),
        (dict(q_bits=4), "--q_bits 4: .*allowed: 8"),
        (dict(p_bits=4), "--p_bits 4: .*allowed: 8, 12"),
        (dict(w_bits=5, w_dtype="bitmod"), "--w_bits 5: .*allowed: 3, 4"),
        (dict(k_bits=4, k_group_size=0), "--k_group_size 0: invalid group size"),
    ],
)
def test_refused_combinations_name_the_flag(flags, match):
    with pytest.raises(ValueError, match=match):
        QuantPlan.from_flags(**flags)


def test_plan_checks_targets_and_kv_layout():
    with pytest.raises(ValueError, match="QuantPlan.k must be QuantArgs"):
        QuantPlan(k=QuantArgs(bits=4, target="value"))
    with pytest.raises(ValueError, match="keys must be per_channel"):
        QuantPlan(k=QuantArgs(bits=4, target="key"), kv=KVArgs(method="KCVT"))
    with pytest.raises(ValueError, match=r"QuantPlan\.k\.bits=4: the KV cache is asymmetric INT"):  # the core names its field
        QuantPlan(k=QuantArgs(bits=4, target="key", symmetric=True))


def test_slug_names_residual_mode_post_attn_and_fold():
    assert F(k_bits=4, v_bits=4, kv_residual_len=32, kv_residual_mode="per_query",
             k_quant_post_rope=True).slug() == "k4v4-KTVT-r32pq-postrope"
    assert F(k_bits=4, k_quant_post_rope=True, kv_quant_post_attn=True).slug() == "k4v16-KTVT-postrope-postattn"
    assert F(v_bits=4, p_bits=8, fold_v_scale=False).slug() == "k16v4-KTVT-p8nofold"
    assert F(kv_residual_mode="per_query").kv.per_query_residual is False  # no residual, nothing per query


def test_unknown_residual_mode_is_refused():
    with pytest.raises(ValueError, match="--kv_residual_mode 'newest':.*allowed: 'last', 'per_query'"):
        F(kv_residual_mode="newest")


F = QuantPlan.from_flags
