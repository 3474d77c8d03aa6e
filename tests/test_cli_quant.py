"""Quantization flags: P3-LLM names -> QuantPlan in RunConfig, slug, refusals before loading, end to end."""

import json
import re

import pytest

import main as main_module
from tests.helpers import main_argv
from wkvaq_quant.cli import parse_config
from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.run import RunConfig


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--kv_quant_method", "KCVT", "--k_bits", "4", "--k_group_size", "32", "--apply_k_scale"],
         "--apply_k_scale cannot be combined with --kv_quant_method KCVT"),
        (["--kv_quant_method", "KCVT", "--k_bits", "4", "--apply_k_bias"], "--apply_k_bias cannot be combined"),
        (["--kv_quant_method", "KCVT", "--k_bits", "4", "--k_group_size", "32", "--kv_residual_len", "20"],
         "--kv_residual_len 20 .* multiple of --k_group_size 32"),
        (["--a_bits", "4"], "--a_bits 4: .*allowed: 8"),
        (["--q_bits", "6"], "--q_bits 6: .*allowed: 8"),
        (["--p_bits", "4"], "--p_bits 4: .*allowed: 8, 12"),
        (["--w_bits", "5", "--w_dtype", "fp4_e2m1"], "--w_bits 5: .*allowed: 4"),
        (["--k_bits", "4", "--k_group_size", "0"], "--k_group_size 0: invalid group size"),
        (["--w_bits", "4", "--w_group_size", "-2"], "--w_group_size -2: invalid group size"),
        (["--w_bits", "17"], "--w_bits 17: out of range; allowed: 1..16"),
        (["--kv_residual_len", "-2"], "--kv_residual_len -2"),
        # awq.entry's spelling is not an abbreviation of --w_bits here (allow_abbrev=False)
        (["--w_bit", "4", "--q_group_size", "128"], "unrecognized arguments: --w_bit 4"),
    ],
)
def test_bad_quant_flags_exit_before_loading(tmp_path, tiny_llama, capsys, flags, match, no_model_load):
    with pytest.raises(SystemExit) as err:
        parse_config(main_argv(tiny_llama, tmp_path, *flags))
    assert err.value.code == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("flags", [["--kv_quant_method", "KIVI"], ["--w_dtype", "nf4"], ["--a_dtype", "fp16"]])
def test_bad_quant_choices_exit(tmp_path, tiny_llama, capsys, flags):
    with pytest.raises(SystemExit):
        parse_config(main_argv(tiny_llama, tmp_path, *flags))
    assert flags[0] in capsys.readouterr().err


def test_flags_become_the_plan():
    cfg = parse_config(["--w_bits", "4", "--w_group_size", "128", "--a_bits", "8", "--q_bits", "8", "--k_bits", "4",
                        "--v_bits", "4", "--kv_residual_len", "32", "--apply_k_scale", "--k_quant_post_rope"])
    assert cfg.plan == QuantPlan.from_flags(w_bits=4, w_group_size=128, a_bits=8, q_bits=8, k_bits=4, v_bits=4,
                                            kv_residual_len=32, apply_k_scale=True, k_quant_post_rope=True)
    assert cfg.slug().startswith("w4g128-a8fp8-q8-k4v4-KTVT-r32-postrope-kscale-float32-seq2048-")


def test_fp_slug_unchanged_and_quant_slugs_differ():
    fp = RunConfig(model="m")
    assert fp.slug() == RunConfig(model="m", plan=QuantPlan()).slug()
    assert re.fullmatch(r"fp-float32-seq2048-[0-9a-f]{8}", fp.slug())
    assert fp.slug() == "fp-float32-seq2048-44136fa3"  # the slug of FP results written before quantization existed
    plans = [QuantPlan.from_flags(k_bits=4, v_bits=4), QuantPlan.from_flags(k_bits=4, v_bits=4, k_group_size=16),
             QuantPlan.from_flags(k_bits=4, v_bits=4, k_quant_post_rope=True), QuantPlan.from_flags(w_bits=4)]
    slugs = {fp.slug(), *(RunConfig(model="m", plan=p).slug() for p in plans)}
    assert len(slugs) == 1 + len(plans)


def test_quantized_run_end_to_end(tmp_path, tiny_llama, isolated_cache):
    argv = main_argv(tiny_llama, tmp_path, "--seq_len", "64", "--n_windows", "1", "--w_bits", "4", "--w_group_size", "16",
                 "--a_bits", "8", "--k_bits", "2", "--v_bits", "2", "--q_bits", "8", "--p_bits", "8")
    assert main_module.main(argv) == 0
    (file,) = (tmp_path / "results").rglob("*.json")
    assert file.name.startswith("w4g16-a8fp8-q8-k2v2-KTVT-r1-p8-float32-seq64-nw1-")  # P3-LLM's residual 1
    record = json.loads(file.read_text())
    assert record["config"]["plan"]["k"]["bits"] == 2
    assert record["results"]["wiki_sample"]["ppl"] > 1


def test_no_fold_v_scale_flag():
    assert parse_config(["--p_bits", "8", "--v_bits", "4"]).plan.kv.fold_v_scale
    cfg = parse_config(["--p_bits", "8", "--v_bits", "4", "--no_fold_v_scale"])
    assert not cfg.plan.kv.fold_v_scale and "-p8nofold-" in cfg.slug()


def test_awq_model_path_lp_missing_fails_before_loading(tmp_path, tiny_llama, capsys, no_model_load):
    assert main_module.main(main_argv(tiny_llama, tmp_path, "--awq_model_path_lp", str(tmp_path / "nothing.pt"))) == 2
    assert "--awq_model_path_lp" in capsys.readouterr().err


def test_awq_model_path_lp_loads_weights(tmp_path, tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    from wkvaq_quant.modeling.checkpoint import load_checkpoint_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    sd = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items() if k.endswith("q_proj.weight")}
    torch.save(sd, tmp_path / "lp.pt")
    assert load_checkpoint_weights(model, str(tmp_path / "lp.pt")) == len(sd) == 2
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, sd["model.layers.1.self_attn.q_proj.weight"])
    torch.save({"not.a.param": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="'not.a.param' is not a parameter"):
        load_checkpoint_weights(model, str(tmp_path / "bad.pt"))
    cfg = parse_config(["--awq_model_path_lp", str(tmp_path / "lp.pt"), "--w_bits", "4"])
    assert cfg.slug().startswith("lp-lp.pt-w4-") and cfg.slug() != parse_config(["--w_bits", "4"]).slug()
