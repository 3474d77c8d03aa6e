"""main.py's AWQ with quantized activations: the search sees the inputs quantized (llmc), refused
where it cannot, and carried by a layer-wise run."""

import pytest

from tests.helpers import main_argv
from wkvaq_quant.cli import parse_config

AWQ = ["--w_bits", "4", "--w_group_size", "16", "--weight_algo", "awq", "--n_calib", "2", "--calib_seq_len", "32",
       "--n_grid", "4"]


def test_w_a_plan_searches_on_quantized_inputs_unless_told(tiny_llama, tmp_path):
    act = parse_config(main_argv(tiny_llama, tmp_path, *AWQ, "--a_bits", "8"))
    w_only = parse_config(main_argv(tiny_llama, tmp_path, *AWQ, "--a_bits", "8", "--awq_weight_only_search"))
    assert not act.weight_algo.awq.weight_only_search and w_only.weight_algo.awq.weight_only_search
    assert act.slug() != w_only.slug() and "-wos-" in w_only.slug()


def test_lower_search_dtype_refused_with_quantized_inputs(tiny_llama, tmp_path, capsys, no_model_load):
    with pytest.raises(SystemExit):
        parse_config(main_argv(tiny_llama, tmp_path, *AWQ, "--a_bits", "8", "--search_dtype", "bfloat16"))
    assert "--search_dtype bfloat16 computes weight-only output changes" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [
    ["--a_bits", "8", "--weight_algo", "gptq"],  # GPTQ does not use the activation setting
    ["--a_bits", "8", "--awq_weight_only_search"],  # nor does a weight-only AWQ search
    ["--k_bits", "4"],
], ids=["gptq-a8", "awq-weight-only-a8", "awq-k4"])
def test_layer_wise_refuses_settings_it_would_not_use(tiny_llama, tmp_path, capsys, no_model_load, flags):
    from main import main

    assert main(main_argv(tiny_llama, tmp_path, *AWQ, *flags, "--layer_wise", "--save_quant", str(tmp_path / "d"))) == 2
    assert "--layer_wise writes quantized weights only" in capsys.readouterr().err


def test_weight_only_search_may_use_a_lower_search_dtype(tiny_llama, tmp_path):
    cfg = parse_config(main_argv(tiny_llama, tmp_path, *AWQ, "--a_bits", "8", "--search_dtype", "bfloat16",
                                 "--awq_weight_only_search"))
    assert cfg.weight_algo.awq.search_dtype == "bfloat16"


def test_layer_wise_awq_carries_the_activation_setting(tiny_llama, tmp_path, isolated_cache):
    from main import main

    out = tmp_path / "q"
    assert main(main_argv(tiny_llama, tmp_path, *AWQ, "--a_bits", "4", "--a_dtype", "int", "--layer_wise",
                          "--save_quant", str(out))) == 0
    assert (out / "model.safetensors.index.json").is_file() or any(out.glob("*.safetensors"))

