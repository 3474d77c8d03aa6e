"""P3-LLM's command lines (its scripts/test_ppl_template.sh, `run_ppl.py` replaced by main.py) parse
to the plan the project's own flags give, with P3-LLM's defaults: residual 1, integer zero point."""

import pytest

from tests.helpers import main_argv
from wkvaq_quant.cli import parse_config

KV = ["--kv_quant_method", "KTVT", "--k_bits", "4", "--v_bits", "4", "--k_group_size", "128", "--v_group_size", "128"]


def _p3(model, out, *flags):
    """A P3-LLM line: --model_name, --datasets wikitext,c4, --output_dir."""
    return ["--model_name", str(model), "--datasets", "wikitext,c4", "--seq_len", "2048", "--output_dir", str(out),
            *flags]


def _ours(model, out, *flags):
    return ["--model", str(model), "--datasets", "wikitext2,c4", "--seq_len", "2048", "--results_dir", str(out),
            *flags]


@pytest.mark.parametrize("p3, ours", [
    (KV, [*KV, "--kv_residual_len", "1", "--kv_zero_point", "int"]),
    ([*KV, "--apply_k_scale"], [*KV, "--apply_k_scale", "--kv_residual_len", "1"]),
    (["--w_bits", "4", "--w_group_size", "128"], ["--w_bits", "4", "--w_group_size", "128"]),
    ([*KV, "--p_bits", "8", "--w_bits", "4", "--w_group_size", "128", "--a_bits", "8", "--a_group_size", "-1"],
     [*KV, "--p_bits", "8", "--w_bits", "4", "--w_group_size", "128", "--a_bits", "8", "--kv_residual_len", "1"]),
], ids=["kv", "kv-kscale", "weights", "full"])
def test_p3llm_template_lines_parse_to_our_plan(tiny_llama, tmp_path, p3, ours):
    a, b = parse_config(_p3(tiny_llama, tmp_path, *p3)), parse_config(_ours(tiny_llama, tmp_path, *ours))
    assert a.plan == b.plan and a.slug() == b.slug() and a.datasets == ["wikitext2", "c4"]
    assert str(a.results_dir) == str(tmp_path)
    if a.plan.k.enabled:
        assert a.plan.kv.residual_len == 1 and a.plan.k.zero_point == "int" == a.plan.v.zero_point


def test_use_fp16_is_the_unquantized_model_in_float16(tiny_llama, tmp_path, capsys):
    cfg = parse_config(_p3(tiny_llama, tmp_path, "--use_fp16"))
    assert cfg.plan.is_full_precision and cfg.dtype == "float16"
    both = parse_config(_p3(tiny_llama, tmp_path, "--use_fp16", "--w_bits", "4", "--k_bits", "4"))
    assert both.plan.is_full_precision and both.slug() == cfg.slug()
    assert "ignoring --w_bits, --k_bits" in capsys.readouterr().err  # said, not silent
    with pytest.raises(SystemExit):
        parse_config(_p3(tiny_llama, tmp_path, "--use_fp16", "--dtype", "float32"))
    assert "--use_fp16 evaluates in float16, but --dtype float32" in capsys.readouterr().err


def test_residual_defaults_per_method_and_only_where_attention_is_quantized(tiny_llama, tmp_path):
    kcvt = parse_config(main_argv(tiny_llama, tmp_path, "--kv_quant_method", "KCVT", "--k_bits", "4",
                                  "--k_group_size", "16"))
    assert kcvt.plan.kv.residual_len == 0  # P3-LLM's 1 cannot fill KCVT's token groups
    w_only = parse_config(main_argv(tiny_llama, tmp_path, "--w_bits", "4"))
    assert w_only.plan.kv.residual_len == 0  # nothing in the attention: R has no effect, one name
    assert parse_config(main_argv(tiny_llama, tmp_path, "--q_bits", "8")).plan.kv.residual_len == 1
