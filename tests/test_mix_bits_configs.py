"""The shipped configs/*.yml resolved on a tiny random 32-block Llama, against tables written by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from wkvaq_quant.config import QuantArgs

from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.mix_bits import load_quant_config
from wkvaq_quant.modeling import attach
from wkvaq_quant.modeling.attach import block_linears, decoder_blocks

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FP = (QuantArgs(bits=16, target="weight"), QuantArgs(bits=16, dtype="fp8_e4m3", target="activation"))
A_OFF = FP[1]


def _w(bits: int, group: int = -1) -> QuantArgs:
    return QuantArgs(bits=bits, dtype="int", group_size=group, symmetric=False, target="weight")


def _a(bits: int) -> QuantArgs:
    return QuantArgs(bits=bits, dtype="int", symmetric=True, granularity="per_token", target="activation")


# code -> (weight, input activation)
G128 = {"4": (_w(4, 128), A_OFF), "8": (_w(8, 128), A_OFF), "-": FP}
W4A4 = {"44": (_w(4), _a(4)), "88": (_w(8), _a(8)), "66": (_w(6), _a(6)), "4-": (_w(4), A_OFF), "--": FP}

# rows: block -> codes of q k v o gate up down
TABLE_1 = ["4 4 4 4 4 4 8"] * 32
TABLE_2 = [
    "4 4 4 - 4 4 8",  # 0
    "4 4 4 - 4 4 8",  # 1
    "4 4 4 - 4 4 8",  # 2
    "4 4 4 - 4 4 8",  # 3
    *["4 4 4 - 4 4 4"] * 24,  # 4..27
    "4 4 4 - 4 4 8",  # 28
    "4 4 4 - 4 4 8",  # 29
    "4 4 4 - 4 4 8",  # 30
    "4 4 4 - 4 4 8",  # 31
]
TABLE_3 = ["44 44 44 44 44 44 88"] * 32
TABLE_4 = [
    "44 44 44 44 44 44 88",  # 0: down W8A8
    "44 44 44 44 44 44 88",  # 1: down W8A8
    "44 44 44 -- 44 44 --",  # 2: down and o fp
    "44 44 44 44 44 44 44",  # 3
    "44 44 44 44 44 44 --",  # 4: down fp
    "44 44 44 44 44 44 44",  # 5
    "44 44 44 44 44 44 --",  # 6: down fp
    "44 44 44 -- 44 44 44",  # 7: o fp
    "44 44 44 44 44 44 88",  # 8: down W8A8
    "44 44 44 44 44 44 44",  # 9
    "44 44 44 44 44 44 44",  # 10
    "44 44 44 44 44 44 --",  # 11: down fp
    "44 44 44 44 44 44 44",  # 12
    "44 44 44 44 44 44 4-",  # 13: down weight-only W4
    "44 44 44 44 44 44 44",  # 14
    "44 44 44 44 44 44 88",  # 15: down W8A8
    "44 44 44 44 44 44 44",  # 16
    "44 44 44 44 44 44 44",  # 17
    "44 44 44 44 44 44 44",  # 18
    "44 44 44 44 44 44 44",  # 19
    "44 44 44 44 44 44 44",  # 20
    "44 44 44 44 44 44 4-",  # 21: down weight-only W4
    "44 44 44 44 44 44 44",  # 22
    "44 44 44 44 44 44 44",  # 23
    "44 44 44 44 44 44 44",  # 24
    "44 44 44 44 44 44 44",  # 25
    "44 44 44 44 44 44 44",  # 26
    "44 44 44 44 44 44 66",  # 27: down W6A6
    "44 44 44 44 44 44 44",  # 28
    "44 44 44 44 44 44 44",  # 29
    "44 44 44 44 44 44 44",  # 30
    "44 44 44 44 44 44 44",  # 31
]


@pytest.fixture(scope="module")
def llama32():
    """A tiny random Llama with Llama-2-7B's depth (32 blocks)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=32,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("name, codes, table", [
    ("w4g128_down_proj_w8.yml", G128, TABLE_1),
    ("w4g128_edge_down_proj_w8_o_proj_fp.yml", G128, TABLE_2),
    ("w4a4_down_proj_w8a8.yml", W4A4, TABLE_3),
    ("w4a4_mixed_everything.yml", W4A4, TABLE_4),
])
def test_shipped_config_resolves_to_the_hand_table(llama32, name, codes, table):
    assert len(table) == 32 and len(decoder_blocks(llama32)) == 32
    plan = load_quant_config(CONFIGS / name).apply(QuantPlan())
    plan.layers.check_depth(len(decoder_blocks(llama32)))
    resolved = {(b, short): plan.linear_args(b, short) for b, short, _, _ in block_linears(llama32)}
    assert len(resolved) == 32 * 7
    for block, row in enumerate(table):
        for short, code in zip(NAMES, row.split(), strict=True):
            assert resolved[block, short] == codes[code], (name, block, short)
    assert not plan.is_full_precision and plan.block_plan(5) == plan.block_plan(-1)
    attach(llama32, plan).remove()  # the 32-block model takes the plan (depth checked again by attach)


def test_config_4_blocks_13_21_are_a_list_not_a_range():
    plan = load_quant_config(CONFIGS / "w4a4_mixed_everything.yml").apply(QuantPlan())
    assert plan.linear_args(13, "down_proj") == plan.linear_args(21, "down_proj") == W4A4["4-"]
    assert all(plan.linear_args(b, "down_proj") == W4A4["44"] for b in (14, 16, 17, 18, 19, 20))


def test_configs_are_refused_past_the_model_depth():
    plan = load_quant_config(CONFIGS / "w4g128_edge_down_proj_w8_o_proj_fp.yml").apply(QuantPlan())
    with pytest.raises(ValueError, match=r"setting 'setting_0': layer_name entry 'down_proj#0-1-2-3-28-29-30-31' "
                                         r"names block\(s\) 30, 31, but the model has 30 blocks; allowed: 0..29"):
        plan.layers.check_depth(30)
    plan.layers.check_depth(32)


def test_bitmod_fp8_kv_edges_config(llama32):
    """Config 5: BitMoD W4 / FP8 A everywhere, INT8 down_proj, KV8 in blocks 0, 1, 30, 31 over flags' KV4."""
    flags = QuantPlan.from_flags(k_bits=4, v_bits=4, k_group_size=8, v_group_size=8)
    plan = load_quant_config(CONFIGS / "w4bitmod_a8fp8_kv_edges8.yml").apply(flags)
    plan.layers.check_depth(len(decoder_blocks(llama32)))
    fp8 = QuantArgs(bits=8, dtype="fp8_e4m3", granularity="per_token", target="activation")
    bitmod4 = (QuantArgs(bits=4, dtype="bitmod", group_size=128, target="weight"), fp8)
    int8 = (QuantArgs(bits=8, dtype="int", group_size=128, symmetric=False, target="weight"), fp8)
    kv8 = [0, 1, 30, 31]  # written out: the blocks whose KV cache stays at 8 bits
    for block, short, _, _ in block_linears(llama32):
        assert plan.linear_args(block, short) == (int8 if short == "down_proj" else bitmod4), (block, short)
    for block in range(32):
        bits = 8 if block in kv8 else 4
        ref = QuantPlan.from_flags(k_bits=bits, v_bits=bits, k_group_size=8, v_group_size=8)
        assert (plan.block_plan(block).k, plan.block_plan(block).v) == (ref.k, ref.v), block
