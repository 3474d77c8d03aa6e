"""`python -m awq.entry`: search -> cache -> apply -> fake-quantized checkpoint, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from awq import entry
from wkvaq_quant.weights.awq.cache import check_cache, load_cache, save_cache
from wkvaq_quant.weights.awq.pre_quant import apply_awq, run_awq
from tests.awq.helpers import calib_ids, planted_model
from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.modeling.checkpoint import load_checkpoint_weights
from wkvaq_quant.weights.rtn import rtn_quantize

CALIB = ["--n_calib", "4", "--calib_seq_len", "32", "--no_progress", "--n_grid", "5"]


@pytest.fixture
def forbid_model_load(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(entry, "load_model", forbidden)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_run_dump_load_dump_fake_roundtrip(tiny_llama, tmp_path, isolated_cache):
    from transformers import AutoModelForCausalLM

    cache_path = tmp_path / "awq_cache" / "tiny-w3-g32-bitmod.pt"
    fmt = ["--model", str(tiny_llama), "--w_bit", "3", "--q_group_size", "32", "--wq_dtype", "bitmod"]
    assert entry.main([*fmt, *CALIB, "--run_awq", "--dump_awq", str(cache_path)]) == 0
    cache = load_cache(cache_path)
    assert cache["meta"]["format"] == {"dtype": "bitmod", "bits": 3, "group_size": 32, "double_quant": False}
    assert cache["meta"]["search"]["n_calib"] == 4 and cache["meta"]["search"]["calib_dataset"] == "wiki_sample"
    out = tmp_path / "fake"
    assert entry.main([*fmt, "--no_progress", "--load_awq", str(cache_path), "--dump_fake", str(out)]) == 0
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors")) and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".fake*"))

    # the same weights, computed in memory
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    fp = copy.deepcopy(ref)
    apply_awq(ref, cache)
    grids = rtn_quantize(ref, QuantPlan.from_flags(w_bits=3, w_group_size=32, w_dtype="bitmod"))
    assert all(torch.equal(grids[n], cache["grid"][n]) for n in grids)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = calib_ids(2, 24)
    assert torch.equal(_logits(reloaded, ids), _logits(ref, ids))
    # main.py's --awq_model_path_lp loads the same checkpoint over the FP model
    load_checkpoint_weights(fp, str(out))
    assert torch.equal(_logits(fp, ids), _logits(ref, ids))


def test_dump_fake_without_cache_is_rtn(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "rtn"
    with pytest.raises(SystemExit):  # double quant needs groups
        entry.main(["--model", str(tiny_llama), "--q_group_size", "-1", "--use_double_quant", "--dump_fake", str(out)])
    assert entry.main(["--model", str(tiny_llama), "--w_bit", "4", "--q_group_size", "16", "--use_double_quant",
                       "--no_progress", "--dump_fake", str(out)]) == 0
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    plan = QuantPlan.from_flags(w_bits=4, w_group_size=16)
    rtn_quantize(ref, QuantPlan(w=plan.w.replace(double_quant=True)))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    for (n, a), b in zip(ref.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("argv,match", [
    (["--run_awq"], "--dump_awq or --dump_fake"),
    (["--dump_awq", "x.pt"], "--dump_awq needs --run_awq"),
    ([], "nothing to do"),
    (["--run_awq", "--dump_awq", "x.pt", "--load_awq", "y.pt"], "exclude each other"),
    (["--load_awq", "missing.pt"], "--load_awq 'missing.pt': no such file"),
    (["--wq_dtype", "nf4", "--load_awq", "y.pt"], "invalid choice: 'nf4'"),
    (["--w_bit", "5", "--wq_dtype", "bitmod", "--dump_fake", "d"], "--w_bit 5"),
    (["--w_bit", "16", "--dump_fake", "d"], "--w_bit 16"),
    (["--q_group_size", "0", "--dump_fake", "d"], "--q_group_size 0: invalid group size"),  # not --w_bit 4
    (["--q_group_size", "-2", "--dump_fake", "d"], "--q_group_size -2: invalid group size"),
    (["--search_dtype", "fp8", "--dump_fake", "d"], "--search_dtype: invalid choice: 'fp8'"),
])
def test_bad_flags_fail_before_loading(argv, match, capsys, forbid_model_load):
    with pytest.raises(SystemExit):
        entry.parse_config(argv)
    assert match in capsys.readouterr().err


def test_cache_of_another_model_refused_before_loading(tmp_path, int_cache, tiny_llama, capsys, forbid_model_load):
    cache, _ = int_cache
    path = save_cache(cache, tmp_path / "tiny.pt")  # made for "tiny", not for this checkpoint's name
    assert entry.main(["--model", str(tiny_llama), "--w_bit", "3", "--q_group_size", "32", "--load_awq", str(path),
                       "--dump_fake", str(tmp_path / "d")]) == 2
    assert "was made for model 'tiny'" in capsys.readouterr().err


def test_existing_dump_fake_dir_refused(tmp_path, capsys, forbid_model_load):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        entry.parse_config(["--dump_fake", str(tmp_path / "d")])
    assert "exists and is not empty" in capsys.readouterr().err


def test_group_size_not_dividing_gives_a_shorter_last_group():
    """64 input channels with group 48: groups of 48 and 16, each with its own clip value."""
    model = planted_model()
    orig = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = QuantPlan.from_flags(w_bits=3, w_group_size=48)
    cache = run_awq(model, plan, calib_ids(4, 16), "tiny", n_grid=10, batch_size=4, progress=False)
    entry_ = cache["clip"]["model.layers.0.self_attn.o_proj"]
    assert entry_["group_size"] == 48 and entry_["max_val"].shape == (64, 2)
    assert cache["clip"]["model.layers.0.mlp.down_proj"]["max_val"].shape == (64, 3)  # 128 = 48 + 48 + 32
    w = model.model.layers[0].self_attn.o_proj.weight
    w0 = orig["model.layers.0.self_attn.o_proj.weight"]
    scale = cache["scale"]  # o_proj is not scaled (GQA), so its clipping alone changed it
    assert "model.layers.0.self_attn.v_proj" not in scale
    m = entry_["max_val"]
    for g, cols in ((0, slice(0, 48)), (1, slice(48, 64))):
        assert torch.equal(w[:, cols], w0[:, cols].clamp(-m[:, g: g + 1], m[:, g: g + 1]))
        assert (m[:, g] <= w0[:, cols].abs().amax(1)).all()
    assert (m[:, 1] < w0[:, 48:].abs().amax(1)).any()  # the short group is clipped by its own search


@pytest.fixture(scope="module")
def int_cache():
    model = planted_model()
    plan = QuantPlan.from_flags(w_bits=3, w_group_size=32)
    return run_awq(model, plan, calib_ids(4, 16), "tiny", n_grid=4, batch_size=4, progress=False), plan


def test_cache_refusals(tmp_path, int_cache):
    from transformers import LlamaConfig, LlamaForCausalLM

    cache, plan = int_cache
    model = planted_model()
    check_cache(cache, model, "tiny", plan)  # the right model and format pass
    with pytest.raises(ValueError, match="made for model 'tiny', not 'other'"):
        check_cache(cache, model, "other", plan)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    with pytest.raises(ValueError, match="made for another model: its layers differ.*gate_proj"):
        check_cache(cache, wider, "tiny", plan)
    for other in (QuantPlan.from_flags(w_bits=3, w_group_size=32, w_dtype="bitmod"),
                  QuantPlan.from_flags(w_bits=4, w_group_size=32), QuantPlan.from_flags(w_bits=3, w_group_size=16)):
        with pytest.raises(ValueError, match="another weight format"):
            check_cache(cache, model, "tiny", other)


def test_cache_files_refused(tmp_path, int_cache):
    cache, _ = int_cache
    with pytest.raises(ValueError, match="no such file"):
        load_cache(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable AWQ cache"):
        load_cache(tmp_path / "junk.pt")
    torch.save({"state_dict": torch.zeros(2)}, tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="not an AWQ cache"):
        load_cache(tmp_path / "sd.pt")
    torch.save({**cache, "extra": _Unsafe()}, tmp_path / "pickled.pt")  # arbitrary objects are not unpickled
    with pytest.raises(ValueError, match="not a readable AWQ cache"):
        load_cache(tmp_path / "pickled.pt")
    path = save_cache(cache, tmp_path / "ok.pt")
    assert set(load_cache(path)) == {"scale", "clip", "grid", "meta"}


class _Unsafe:
    pass


def _yaml(tmp_path, text: str):
    path = tmp_path / "mix.yml"
    path.write_text(text)
    return str(path)


def test_config_mix_bits_leaves_unquantized_layers_alone(tiny_llama, tmp_path, isolated_cache):
    """--config: down_proj of block 0 unquantized (neither scaled nor clipped nor rounded), o_proj at 8 bits."""
    from transformers import AutoModelForCausalLM

    cfg = _yaml(tmp_path, "quant:\n  method: Awq\n  mix_bits:\n    setting_0:\n      layer_name: [down_proj#0]\n"
                          "      do_quant: False\n    setting_1:\n      layer_name: [o_proj]\n"
                          "      weight: {bit: 8, symmetric: False, granularity: per_group, group_size: 16}\n")
    out = tmp_path / "fake"
    argv = ["--model", str(tiny_llama), "--w_bit", "3", "--q_group_size", "16", "--config", cfg, *CALIB,
            "--run_awq", "--dump_fake", str(out)]
    assert entry.main(argv) == 0
    fp = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    got = AutoModelForCausalLM.from_pretrained(out).eval()
    fp_sd, got_sd = fp.state_dict(), got.state_dict()
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(got_sd[name], fp_sd[name])  # not scaled (up_proj's scales skip it) and not quantized
    assert not torch.equal(got_sd["model.layers.1.mlp.down_proj.weight"], fp_sd["model.layers.1.mlp.down_proj.weight"])
    w_o = got_sd["model.layers.0.self_attn.o_proj.weight"]
    n_levels = max(len(torch.unique(g)) for g in w_o.view(-1, 16))
    assert 8 < n_levels <= 256  # 8-bit groups (more than 3-bit's 8 levels)


@pytest.mark.parametrize("text,match", [
    ("quant:\n  method: Gptq\n", "quant.method Gptq cannot run in awq.entry"),
    ("quant:\n  method: Awq\n  act: {bit: 8, symmetric: True, granularity: per_token}\n", "weights only"),
    ("quant:\n  method: Awq\n  weight: {bit: 4, symmetric: False, granularity: per_group, group_size: 128}\n",
     "--w_bit 3 contradicts quant.weight.bit"),
])
def test_config_refusals(tmp_path, text, match, capsys, forbid_model_load):
    with pytest.raises(SystemExit):
        entry.parse_config(["--w_bit", "3", "--config", _yaml(tmp_path, text), "--dump_fake", str(tmp_path / "d")])
    assert match in capsys.readouterr().err
