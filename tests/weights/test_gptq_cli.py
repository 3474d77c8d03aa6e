"""main.py --weight_algo gptq (and quant.method: Gptq): flags, refusals before loading, slugs, a run."""

from __future__ import annotations

import json

import pytest

import main as main_module
from tests.conftest import FAMILY_CHECKPOINTS
from tests.helpers import main_argv
from wkvaq_quant.cli import parse_config
from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.mix_bits import parse_quant_config
from wkvaq_quant.weights.algo import quantizes_weights, without_weights

BASE = ["--seq_len", "64", "--n_windows", "2", "--n_calib", "4", "--calib_seq_len", "32"]
RUN = [*BASE, "--w_bits", "4", "--w_group_size", "16"]
YAML = """quant:
  method: Gptq
  weight: {bit: 4, symmetric: False, granularity: per_group, group_size: 16}
  mix_bits:
    setting_0:
      layer_name: [down_proj#1]
      do_quant: False
"""


def test_flags_parse_into_the_weight_algo(tmp_path, tiny_llama):
    cfg = parse_config(main_argv(tiny_llama, tmp_path, *RUN, "--weight_algo", "gptq", "--percdamp", "0.05",
                                 "--act_order", "--static_groups", "--gptq_next_inputs", "fp", "--seed", "3"))
    a = cfg.weight_algo
    assert (a.name, a.gptq.percdamp, a.gptq.act_order, a.gptq.static_groups, a.gptq.next_inputs) == \
        ("gptq", 0.05, True, True, "fp")
    assert (a.calib.n_samples, a.calib.seq_len, a.calib.seed) == (4, 32, 3)
    assert cfg.slug().startswith("gptq-ao-sg-fpin-d0.05-n4x32-w4g16-")
    assert cfg.weight_method == "Gptq"
    # RTN keeps its result names, whether or not the flag is given; GPTQ settings change the name
    rtn = parse_config(main_argv(tiny_llama, tmp_path, *RUN))
    assert rtn.slug() == parse_config(main_argv(tiny_llama, tmp_path, *RUN, "--weight_algo", "rtn")).slug()
    assert rtn.slug().startswith("w4g16-")
    plain = parse_config(main_argv(tiny_llama, tmp_path, *RUN, "--weight_algo", "gptq"))
    assert len({rtn.slug(), plain.slug(), cfg.slug()}) == 3
    # --gptq_single_pass changes how, not what: the same result name, but the record keeps it
    single = parse_config(main_argv(tiny_llama, tmp_path, *RUN, "--weight_algo", "gptq", "--gptq_single_pass"))
    assert single.weight_algo.gptq.single_pass and not plain.weight_algo.gptq.single_pass
    assert single.slug() == plain.slug()
    assert single.to_dict()["weight_algo"]["gptq"]["single_pass"] is True


@pytest.mark.parametrize("flags,match", [
    (["--weight_algo", "gptq", "--percdamp", "2"], "--percdamp 2.0: allowed: a number in \\[0, 1\\]"),
    (["--weight_algo", "gptq", "--w_bits", "16"], "--weight_algo gptq needs quantized weights"),
    (["--weight_algo", "smoothquant"], "--weight_algo: invalid choice"),
    (["--weight_algo", "awq", "--n_grid", "0"], "--n_grid"),
    (["--weight_algo", "awq", "--search_dtype", "half"], "--search_dtype: invalid choice"),
    (["--gptq_next_inputs", "both"], "--gptq_next_inputs: invalid choice"),
])
def test_bad_flags_exit_before_loading(tmp_path, tiny_llama, capsys, no_model_load, flags, match):
    with pytest.raises(SystemExit) as err:
        parse_config(main_argv(tiny_llama, tmp_path, *RUN, *flags))
    assert err.value.code == 2
    assert pytest.importorskip("re").search(match, capsys.readouterr().err)


def test_too_long_calibration_window_fails_before_loading(tmp_path, tiny_llama, capsys, isolated_cache,
                                                         no_model_load):
    argv = main_argv(tiny_llama, tmp_path, *RUN, "--weight_algo", "gptq", "--calib_seq_len", "10000000")
    assert main_module.main(argv) == 2
    assert "--calib_seq_len 10000000" in capsys.readouterr().err


def test_without_weights_keeps_activations_and_maps():
    q = parse_quant_config({"quant": {"method": "Gptq", "weight": {"bit": 4, "group_size": 16,
                                                                   "granularity": "per_group"},
                                      "act": {"bit": 8, "symmetric": True, "granularity": "per_token"},
                                      "mix_bits": {"s": {"layer_name": ["q_proj#1"], "weight": {"bit": 3}}}}})
    plan = q.apply(QuantPlan.from_flags())
    off = without_weights(plan)
    assert quantizes_weights(plan) and not quantizes_weights(off)
    for block in (0, 1, 5):
        for layer in ("q_proj", "down_proj"):
            assert off.linear_args(block, layer)[1] == plan.linear_args(block, layer)[1]
            assert not off.linear_args(block, layer)[0].enabled
    assert plan.linear_args(1, "q_proj")[0].bits == 3


def _ppl(tmp_path, name):
    (file,) = (tmp_path / name).rglob("*.json")
    return json.loads(file.read_text())


def test_gptq_run_end_to_end_and_from_yaml(tmp_path, tiny_llama, isolated_cache):
    argv = main_argv(tiny_llama, tmp_path / "flags", *RUN, "--weight_algo", "gptq")
    assert main_module.main(argv) == 0
    rec = _ppl(tmp_path, "flags")
    assert rec["config"]["weight_algo"]["name"] == "gptq" and rec["config"]["weight_algo"]["calib"]["n_samples"] == 4
    assert rec["weight_algo_s"] > 0
    assert main_module.main(main_argv(tiny_llama, tmp_path / "rtn", *RUN)) == 0
    ppl_gptq, ppl_rtn = rec["results"]["wiki_sample"]["ppl"], _ppl(tmp_path, "rtn")["results"]["wiki_sample"]["ppl"]
    assert ppl_gptq > 1 and ppl_rtn > 1 and ppl_gptq != ppl_rtn
    # the same GPTQ through a YAML (quant.method: Gptq): the same numbers; with a map, others
    y = tmp_path / "g.yml"
    y.write_text(YAML.split("  mix_bits:")[0])
    assert main_module.main(main_argv(tiny_llama, tmp_path / "yaml", *BASE, "--config", str(y))) == 0
    assert _ppl(tmp_path, "yaml")["results"]["wiki_sample"]["ppl"] == pytest.approx(ppl_gptq, rel=1e-6)
    y.write_text(YAML)
    assert main_module.main(main_argv(tiny_llama, tmp_path / "map", *BASE, "--config", str(y))) == 0
    rec = _ppl(tmp_path, "map")
    assert rec["config"]["weight_method"] == "Gptq" and "-mix" in rec["slug"]
    assert rec["results"]["wiki_sample"]["ppl"] != pytest.approx(ppl_gptq, rel=1e-6)


@pytest.mark.parametrize("flags,match", [
    (["--layer_wise"], "--layer_wise needs --save_quant DIR"),
    (["--save_quant", "x"], "--save_quant DIR is written by --layer_wise"),
    (["--layer_wise", "--save_quant", "x", "--a_bits", "8"], "--layer_wise writes quantized weights only"),
    (["--layer_wise", "--save_quant", "x", "--offload_activations"], "--offload_activations keeps activations on disk"),
    (["--weight_algo", "gptq", "--offload_activations"], "allowed with: --layer_wise --weight_algo gptq"),
    (["--layer_wise", "--save_quant", "x", "--weight_algo", "gptq", "--gptq_single_pass", "--offload_activations"],
     "--offload_activations with --gptq_single_pass"),
])
def test_layer_wise_flags_refused_before_loading(tmp_path, tiny_llama, capsys, no_model_load, flags, match):
    argv = main_argv(tiny_llama, tmp_path, *RUN, *flags)
    try:
        code = main_module.main(argv)
    except SystemExit as err:
        code = err.code
    assert code == 2
    assert match in capsys.readouterr().err


_LW_RUNS = [("tiny_llama", "rtn", ()), ("tiny_llama", "gptq", ()), ("tiny_llama", "gptq", ("--offload_activations",)),
            ("tiny_llama", "awq", ("--n_grid", "4"))]
_LW_RUNS += [(f, algo, extra) for f in FAMILY_CHECKPOINTS for algo, extra in (("gptq", ()), ("awq", ("--n_grid", "4")))]


@pytest.mark.parametrize("fixture,algo,extra", _LW_RUNS,
                         ids=[f"{f.removeprefix('tiny_')}-{a}{'-offload' if e and e[0] == '--offload_activations' else ''}"
                              for f, a, e in _LW_RUNS])
def test_layer_wise_checkpoint_evaluates_like_the_in_memory_run(request, tmp_path, isolated_cache, capsys, fixture,
                                                                algo, extra):
    ckpt = request.getfixturevalue(fixture)
    out = tmp_path / "quant"
    argv = main_argv(ckpt, tmp_path / "lw", *RUN, "--weight_algo", algo, "--layer_wise", "--save_quant", str(out),
                     *extra)
    assert main_module.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n"):])
    assert summary["complete"] and summary["blocks"] == 2 and summary["weight_algo"]["name"] == algo
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    assert main_module.main(argv) == 0  # complete: nothing to do again
    assert main_module.main(main_argv(out, tmp_path / "eval", *BASE)) == 0
    mem = [f for f in extra if f != "--offload_activations"]
    assert main_module.main(main_argv(ckpt, tmp_path / "mem", *RUN, "--weight_algo", algo, *mem)) == 0
    assert _ppl(tmp_path, "eval")["results"]["wiki_sample"]["ppl"] == \
        pytest.approx(_ppl(tmp_path, "mem")["results"]["wiki_sample"]["ppl"], rel=1e-6)
