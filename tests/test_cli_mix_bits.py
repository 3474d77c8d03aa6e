"""--config / --show_plan in main.py: refusals before loading, the printed table, a run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import main as main_module
from tests.helpers import main_argv
from wkvaq_quant.cli import parse_config
from wkvaq_quant.config import QuantArgs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TWO_BLOCKS = """quant:
  method: {method}
  weight: {{bit: 4, symmetric: False, granularity: per_group, group_size: 16}}
  act: {{bit: 8, symmetric: True, granularity: per_token}}
  mix_bits:
    setting_0:
      layer_name: [down_proj#1, o_proj#0]
      do_quant: False
    setting_1:
      layer_name: [q_proj#1]
      weight: {{bit: 3, dtype: bitmod, group_size: 32}}
      k_bits: 4
      v_bits: 4
"""


def _yaml(tmp_path, method: str = "RTN") -> str:
    path = tmp_path / f"two_blocks_{method}.yml"
    path.write_text(TWO_BLOCKS.format(method=method))
    return str(path)


def test_block_past_the_depth_is_refused_before_loading(tmp_path, tiny_llama, capsys, no_model_load):
    argv = main_argv(tiny_llama, tmp_path, "--config", str(CONFIGS / "w4a4_mixed_everything.yml"))
    assert main_module.main(argv) == 2
    err = capsys.readouterr().err
    assert "mix_bits setting 'setting_0': layer_name entry 'down_proj#0-1-8-15' names block(s) 8, 15, but the model " \
           "has 2 blocks; allowed: 0..1" in err
    assert main_module.main([*argv, "--show_plan"]) == 2


def test_flag_contradicting_the_yaml_exits(tmp_path, tiny_llama, capsys):
    with pytest.raises(SystemExit) as err:
        parse_config(main_argv(tiny_llama, tmp_path, "--config", _yaml(tmp_path), "--w_group_size", "128"))
    assert err.value.code == 2
    assert "--w_group_size 128 contradicts quant.weight.group_size: 16" in capsys.readouterr().err
    cfg = parse_config(main_argv(tiny_llama, tmp_path, "--config", _yaml(tmp_path), "--w_bits", "4", "--k_bits", "8"))
    assert cfg.plan.w == QuantArgs(bits=4, group_size=16) and cfg.plan.k.bits == 8  # agreeing / refining flags
    assert cfg.plan.block_plan(1).k.bits == 4 and cfg.plan.block_plan(0).k.bits == 8


def test_yaml_method_selects_the_weight_algo(tmp_path, tiny_llama, capsys, no_model_load):
    cfg = parse_config(main_argv(tiny_llama, tmp_path, "--config", _yaml(tmp_path, "Awq"), "--n_grid", "7"))
    assert cfg.weight_method == "Awq" and cfg.weight_algo.name == "awq" and cfg.weight_algo.awq.n_grid == 7
    cfg = parse_config(main_argv(tiny_llama, tmp_path, "--config", _yaml(tmp_path, "Gptq"), "--act_order"))
    assert cfg.weight_method == "Gptq" and cfg.weight_algo.name == "gptq" and cfg.weight_algo.gptq.act_order
    cfg = parse_config(main_argv(tiny_llama, tmp_path, "--config", _yaml(tmp_path, "RTN"), "--weight_algo", "awq"))
    assert cfg.weight_method == "Awq" and cfg.weight_algo.name == "awq"  # an RTN YAML leaves the algorithm open
    with pytest.raises(SystemExit):
        parse_config(main_argv(tiny_llama, tmp_path, "--config", _yaml(tmp_path, "Awq"), "--weight_algo", "gptq"))
    assert ("--weight_algo gptq contradicts quant.method: Awq in" in capsys.readouterr().err)


def test_show_plan_prints_the_resolved_table(tmp_path, tiny_llama, capsys, isolated_cache, no_model_load):
    assert main_module.main(main_argv(tiny_llama, tmp_path, "--config", _yaml(tmp_path), "--show_plan")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("plan w4g16-a8int-mix") and "(2 blocks), weight method RTN, from " in lines[0]
    assert lines[1].split() == ["block", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj", "kv"]
    assert lines[2].split() == ["0", "W4g16/A8", "W4g16/A8", "W4g16/A8", "fp", "W4g16/A8", "W4g16/A8", "W4g16/A8",
                                "fp"]
    assert lines[3].split() == ["1", "W3g32bm", "W4g16/A8", "W4g16/A8", "W4g16/A8", "W4g16/A8", "W4g16/A8", "fp",
                                "K4V4"]
    assert not (tmp_path / "results").exists()


def test_run_with_a_config_end_to_end(tmp_path, tiny_llama, isolated_cache):
    argv = main_argv(tiny_llama, tmp_path, "--seq_len", "64", "--n_windows", "1", "--config", _yaml(tmp_path))
    assert main_module.main(argv) == 0
    (file,) = (tmp_path / "results").rglob("*.json")
    assert file.name.startswith("w4g16-a8int-mix")
    record = json.loads(file.read_text())
    cfg = record["config"]
    assert cfg["weight_method"] == "RTN" and cfg["config_file"].endswith("two_blocks_RTN.yml")
    settings = cfg["plan"]["layers"]["settings"]
    assert [s["layer_name"] for s in settings] == [["down_proj#1", "o_proj#0"], ["q_proj#1"]]
    assert settings[1]["k_bits"] == 4 and settings[1]["w"]["dtype"] == "bitmod"
    assert record["results"]["wiki_sample"]["ppl"] > 1
