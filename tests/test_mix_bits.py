"""llmc quant YAML: every refusal names the setting and the entry; flags + YAML; plan properties."""

from __future__ import annotations

import re

import pytest
import yaml

from wkvaq_quant.config import QuantArgs

from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.mix_bits import load_quant_config, parse_quant_config
from wkvaq_quant.plan import LayerTarget
from wkvaq_quant.run import RunConfig

HEAD = "quant:\n  method: RTN\n  weight: {bit: 4, group_size: 128}\n  mix_bits:\n    setting_0:\n"


def _parse(text: str):
    return parse_quant_config(yaml.safe_load(text), "c.yml")


def _resolve(text: str) -> QuantPlan:
    return _parse(text).apply(QuantPlan())


def _setting(body: str) -> str:
    return HEAD + "".join(f"      {line}\n" for line in body.strip().splitlines())


@pytest.mark.parametrize("body, match", [
    ("layer_name: [down_proj]\nweight: {bit: 8}\nquant_out: True",
     "c.yml: quant.mix_bits.setting_0: unknown key\\(s\\) 'quant_out'; allowed: 'layer_name', 'do_quant'"),
    ("layer_name: [down_proj]\nweight: {bit: 8, int_range: [-8, 7]}",
     "quant.mix_bits.setting_0.weight: unknown key\\(s\\) 'int_range'; allowed: 'bit', 'symmetric'"),
    ("layer_name: [mlp.down_proj]\nweight: {bit: 8}",
     "quant.mix_bits.setting_0.layer_name entry 'mlp.down_proj': unknown layer name 'mlp.down_proj'; allowed: "
     "'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'"),
    ("layer_name: [lm_head]\ndo_quant: False", "entry 'lm_head': unknown layer name"),
    ("layer_name: [down_proj#1-]\nweight: {bit: 8}",
     "entry 'down_proj#1-': after '#' come block indices joined by '-'"),
    ("layer_name: [down_proj#13..21]\nweight: {bit: 8}", "entry 'down_proj#13..21': after '#' come block indices"),
    ("layer_name: [down_proj#3-3]\nweight: {bit: 8}", r"entry 'down_proj#3-3': block indices \(3, 3\) repeat a block"),
    ("layer_name: [7]\nweight: {bit: 8}", "entry 7: entry 7 must be a string"),
    ("layer_name: down_proj\nweight: {bit: 8}", "setting_0.layer_name='down_proj': must be a non-empty list"),
    ("layer_name: []\nweight: {bit: 8}", "setting_0.layer_name=\\[\\]: must be a non-empty list"),
    ("weight: {bit: 8}", "setting_0: 'layer_name' is required"),
    ("layer_name: [down_proj]\nweight: {bit: 5, dtype: bitmod}",
     "setting_0.weight: QuantArgs.bits=5: not supported by dtype='bitmod'; allowed: 3, 4"),
    ("layer_name: [down_proj]\nweight: {bit: 16}", r"setting_0.weight.bit=16: must be an integer below 16 "
                                                   r"\(do_quant: False keeps layers in full precision\)"),
    ("layer_name: [down_proj]\nweight: {bit: 0}", "setting_0.weight.bit=0"),
    ("layer_name: [down_proj]\nweight: {bit: 8}\nact: {bit: 4, dtype: fp8_e4m3}",
     "setting_0.act: QuantArgs.bits=4: not supported by dtype='fp8_e4m3'; allowed: 8"),
    ("layer_name: [down_proj]\nweight: {symmetric: True}", "setting_0.weight: 'bit' is required"),
    ("layer_name: [down_proj]\nweight: {bit: 8, symmetric: yes_please}",
     "setting_0.weight.symmetric='yes_please'; allowed: True, False"),
    ("layer_name: [down_proj]\nweight: {bit: 8, granularity: per_block}",
     "setting_0.weight.granularity='per_block'; allowed: 'per_channel', 'per_group', 'per_tensor'"),
    ("layer_name: [down_proj]\nweight: {bit: 8}\nact: {bit: 8, granularity: per_tensor}",
     "setting_0.act.granularity='per_tensor'; allowed: 'per_token'"),
    ("layer_name: [down_proj]\nweight: {bit: 4, dtype: nf4}",
     "setting_0.weight.dtype='nf4'; allowed: 'int', 'bitmod', 'fp4_e2m1'"),
    ("layer_name: [down_proj]\nweight: {bit: 4, group_size: 0}", "setting_0.weight.group_size=0; allowed"),
    ("layer_name: [down_proj]\nweight: {bit: 4, granularity: per_channel, group_size: 64}",
     "setting_0.weight: QuantArgs.group_size=64: weight per_channel has one group per output row"),
    ("layer_name: [o_proj]\ndo_quant: False\nweight: {bit: 8}",
     "setting_0: do_quant: False keeps its layers in full precision, so it cannot also set weight; allowed: "
     "do_quant: False alone"),
    ("layer_name: [o_proj]\ndo_quant: False\nk_bits: 4", "do_quant: False .* cannot also set k_bits"),
    ("layer_name: [o_proj]\ndo_quant: 1", "setting_0.do_quant=1; allowed: True, False"),
    ("layer_name: [o_proj]\nact: {bit: 8}", "setting_0: an 'act' section needs a 'weight' section"),
    ("layer_name: [o_proj]\ndo_quant: True", "setting_0: sets nothing"),
    ("layer_name: [k_proj#3]\nk_bits: 17", r"setting_0.k_bits=17; allowed: 1..15 \(asymmetric INT\) or 16"),
    ("layer_name: [k_proj#3]\nv_bits: 4.5", "setting_0.v_bits=4.5; allowed"),
])
def test_bad_setting_names_setting_and_entry(body, match):
    with pytest.raises(ValueError, match=match):
        _resolve(_setting(body))


@pytest.mark.parametrize("text, match", [
    ("calib: {n_samples: 128}\n" + HEAD + "      layer_name: [o_proj]\n      do_quant: False\n",
     "c.yml: the document: unknown key\\(s\\) 'calib'; allowed: 'quant'"),
    ("quant:\n  method: SmoothQuant\n", "c.yml: quant.method='SmoothQuant'; allowed: 'RTN', 'Awq', 'Gptq'"),
    ("quant:\n  special: {}\n", "c.yml: quant: unknown key\\(s\\) 'special'; allowed: 'method', 'weight', 'act', 'mix_bits'"),
    ("quant:\n  mix_bits: {}\n", "quant.mix_bits must be a non-empty mapping"),
    ("quant:\n  weight: {bit: 4, granularity: per_group}\n",
     "quant.weight: QuantArgs.group_size=-1: granularity='per_group' needs a group size"),
    ("quant:\n  weight: {bit: 16}\n", r"quant.weight.bit=16: must be an integer below 16 \(omit the section\)"),
    ("model: {type: Llama}\n", "unknown key"),
    ("- quant\n", "the document must be a mapping"),
    ("other: 1\n", "unknown key"),
])
def test_bad_file_names_the_key(text, match):
    with pytest.raises(ValueError, match=match):
        _resolve(text)


def test_missing_quant_section_and_repeated_keys(tmp_path):
    with pytest.raises(ValueError, match="c.yml: no 'quant' section"):
        _parse("{}")
    f = tmp_path / "dup.yml"
    f.write_text(HEAD + "      layer_name: [o_proj]\n      do_quant: False\n"
                 "    setting_0:\n      layer_name: [q_proj]\n      do_quant: False\n")
    with pytest.raises(ValueError, match=r"dup.yml: not valid YAML: key 'setting_0' appears twice in one mapping "
                                         r"\(line 8\)"):
        load_quant_config(f)
    with pytest.raises(ValueError, match="--config .*nope.yml: no such file"):
        load_quant_config(tmp_path / "nope.yml")


def test_layer_targets_are_lists_of_blocks():
    assert LayerTarget.parse("down_proj#13-21") == LayerTarget("down_proj", (13, 21))
    assert LayerTarget.parse("o_proj") == LayerTarget("o_proj", None)
    t = LayerTarget.parse("down_proj#0-1-2-3-28-29-30-31")
    assert [b for b in range(40) if t.matches(b, "down_proj")] == [0, 1, 2, 3, 28, 29, 30, 31]
    assert not t.matches(0, "up_proj") and t.text() == "down_proj#0-1-2-3-28-29-30-31"


def test_later_setting_wins_and_sections_refine_the_global():
    plan = _parse(HEAD + "      layer_name: [down_proj]\n      weight: {bit: 8}\n"
                  "    setting_1:\n      layer_name: [down_proj#5, o_proj#5]\n      do_quant: False\n"
                  "    setting_2:\n      layer_name: [down_proj#5-6]\n      weight: {bit: 3, dtype: bitmod}\n"
                  ).apply(QuantPlan())
    w4, a_off = QuantArgs(bits=4, group_size=128), QuantPlan().a
    assert plan.w == w4 and plan.a == a_off
    assert plan.linear_args(0, "down_proj") == (QuantArgs(bits=8, group_size=128), a_off)  # group inherited
    assert plan.linear_args(5, "down_proj") == (QuantArgs(bits=3, dtype="bitmod", group_size=128), a_off)
    assert plan.linear_args(6, "down_proj") == (QuantArgs(bits=3, dtype="bitmod", group_size=128), a_off)
    assert plan.linear_args(5, "o_proj") == (QuantPlan().w, a_off)
    assert plan.linear_args(4, "o_proj") == (w4, a_off)


def test_flags_set_defaults_the_yaml_refines():
    text = ("quant:\n  mix_bits:\n    s:\n      layer_name: [down_proj#1]\n      weight: {bit: 8}\n"
            "      act: {bit: 8}\n")
    base = QuantPlan.from_flags(w_bits=4, w_group_size=16, a_bits=8)  # fp8 activations from the flags
    plan = _parse(text).apply(base, {"w_bits": 4, "w_group_size": 16, "a_bits": 8})
    assert plan.w == base.w and plan.a == base.a
    assert plan.linear_args(1, "down_proj") == (QuantArgs(bits=8, group_size=16), base.a)
    # with no global activations, a setting's act is llmc's symmetric INT per token
    plan = _parse(text).apply(QuantPlan.from_flags(w_bits=4))
    assert plan.linear_args(1, "down_proj")[1] == QuantArgs(bits=8, dtype="int", symmetric=True, target="activation")


@pytest.mark.parametrize("explicit, match", [
    ({"w_bits": 8}, "--w_bits 8 contradicts quant.weight.bit: 4 in c.yml; allowed: --w_bits 4, or leave --w_bits out"),
    ({"w_group_size": -1}, "--w_group_size -1 contradicts quant.weight.group_size: 128"),
    ({"w_dtype": "bitmod"}, "--w_dtype bitmod contradicts quant.weight.dtype: int"),
    ({"a_dtype": "fp8_e4m3"}, "--a_dtype fp8_e4m3 contradicts quant.act.dtype: int"),
    ({"a_bits": 4}, "--a_bits 4 contradicts quant.act.bit: 8"),
])
def test_flag_contradicting_the_global_section_is_an_error(explicit, match):
    quant = _parse("quant:\n  weight: {bit: 4, group_size: 128}\n  act: {bit: 8}\n")
    quant.apply(QuantPlan(), {"w_bits": 4, "w_group_size": 128, "a_bits": 8, "k_bits": 4})  # agreeing flags
    with pytest.raises(ValueError, match=match):
        quant.apply(QuantPlan(), explicit)


def test_kv_settings_are_validated_per_block():
    text = "quant:\n  mix_bits:\n    kv_first:\n      layer_name: [k_proj#0]\n      k_bits: 4\n"
    with pytest.raises(ValueError, match=r"setting 'kv_first': k_bits / v_bits of block 0: --kv_quant_post_attn "
                                         r"needs --k_quant_post_rope"):
        _parse(text).apply(QuantPlan.from_flags(kv_quant_post_attn=True))
    eager = _parse(text).apply(QuantPlan.from_flags(kv_residual_len=4, kv_residual_mode="per_query",
                                                    k_quant_post_rope=True))
    assert eager.needs_eager and eager.quantizes_attention and not eager.block_plan(1).quantizes_attention


def test_plan_properties_slug_and_dict_account_for_the_map():
    fp_map = _parse("quant:\n  mix_bits:\n    s:\n      layer_name: [o_proj]\n      do_quant: False\n").apply(QuantPlan())
    assert fp_map.is_full_precision and fp_map.slug() == "fp"  # a map that quantizes nothing
    only_map = _parse("quant:\n  mix_bits:\n    s:\n      layer_name: [o_proj#3]\n      weight: {bit: 4}\n"
                      ).apply(QuantPlan())
    assert not only_map.is_full_precision and re.fullmatch(r"mix[0-9a-f]{8}", only_map.slug())
    all_fp = _parse("quant:\n  weight: {bit: 4}\n  mix_bits:\n    s:\n      layer_name: [q_proj, k_proj, v_proj, "
                    "o_proj, gate_proj, up_proj, down_proj]\n      do_quant: False\n").apply(QuantPlan())
    assert all_fp.is_full_precision
    d = only_map.to_dict()
    assert d["layers"]["settings"][0]["layer_name"] == ["o_proj#3"] and d["layers"]["settings"][0]["w"]["bits"] == 4
    assert "layers" not in QuantPlan.from_flags(w_bits=4).to_dict()  # plans without a map: dict unchanged
    other = _parse("quant:\n  mix_bits:\n    s:\n      layer_name: [o_proj#4]\n      weight: {bit: 4}\n"
                   ).apply(QuantPlan())
    assert other.slug() != only_map.slug() and hash(other) != hash(only_map)
    assert RunConfig(model="m", plan=other).slug() != RunConfig(model="m", plan=only_map).slug()


def test_kv_bits_for_every_block_turn_the_attention_on():
    plan = _resolve("quant:\n  mix_bits:\n    all:\n      layer_name: [k_proj]\n      k_bits: 4\n      v_bits: 2\n")
    assert plan.quantizes_attention and not plan.is_full_precision and not plan.needs_eager
    assert plan.block_plan(7) == QuantPlan.from_flags(k_bits=4, v_bits=2)
    p8 = _parse("quant:\n  mix_bits:\n    all:\n      layer_name: [k_proj]\n      k_bits: 4\n"
                ).apply(QuantPlan.from_flags(kv_residual_len=4, kv_residual_mode="per_query", k_quant_post_rope=True))
    assert p8.needs_eager
