import json

import pytest

import main as main_module
from tests.helpers import main_argv
from wkvaq_quant import hub, run as run_module
from wkvaq_quant.cli import parse_config
from wkvaq_quant.run import RunConfig


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--seq_len", "0"], "--seq_len must be a positive"),
        (["--seq_len", "-3"], "--seq_len must be a positive"),
        (["--n_windows", "0"], "--n_windows must be positive"),
        (["--datasets", "wikitext3"], "--datasets: unknown .*wikitext3.*allowed values: wikitext2, c4, wiki_sample"),
        (["--batch_size", "0"], "--batch_size must be positive"),
    ],
)
def test_bad_flags_exit_naming_the_flag(tmp_path, tiny_llama, capsys, flags, match, no_model_load):
    with pytest.raises(SystemExit) as err:
        parse_config(main_argv(tiny_llama, tmp_path, *flags))
    assert err.value.code == 2
    import re

    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("flags", [["--dtype", "float8"], ["--device", "tpu"]])
def test_bad_choices_exit(tmp_path, tiny_llama, flags, capsys):
    with pytest.raises(SystemExit):
        parse_config(main_argv(tiny_llama, tmp_path, *flags))
    assert flags[0] in capsys.readouterr().err


def test_unknown_model_fails_before_loading(tmp_path, capsys, no_model_load):
    assert main_module.main(main_argv("llama-9-9b", tmp_path)) == 2
    assert "--model 'llama-9-9b'" in capsys.readouterr().err


def test_n_windows_larger_than_available_fails_before_loading(tmp_path, tiny_llama, isolated_cache, capsys,
                                                              no_model_load):
    assert main_module.main(main_argv(tiny_llama, tmp_path, "--seq_len", "128", "--n_windows", "1000000")) == 2
    err = capsys.readouterr().err
    assert "--n_windows 1000000 is larger than the" in err and "wiki_sample" in err


def test_offline_hub_dataset_fails_before_loading(tmp_path, tiny_llama, monkeypatch, capsys, no_model_load):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WKVAQ_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    assert main_module.main(main_argv(tiny_llama, tmp_path, "--datasets", "wiki_sample,wikitext2")) == 2
    assert "--datasets wikitext2: the Hugging Face hub is not reachable" in capsys.readouterr().err


def test_cuda_request_without_cuda_fails_before_loading(tmp_path, tiny_llama, monkeypatch, capsys, no_model_load):
    monkeypatch.setattr(run_module.torch.cuda, "is_available", lambda: False)
    assert main_module.main(main_argv(tiny_llama, tmp_path, "--device", "cuda")) == 2
    assert "--device cuda" in capsys.readouterr().err


def test_end_to_end_result_file_reuse_and_merge(tmp_path, tiny_llama, isolated_cache, monkeypatch):
    argv = main_argv(tiny_llama, tmp_path, "--seq_len", "64", "--n_windows", "3")
    assert main_module.main(argv) == 0
    files = list((tmp_path / "results").rglob("*.json"))
    assert len(files) == 1
    rec = json.loads(files[0].read_text())
    assert rec["config"]["seq_len"] == 64 and rec["config"]["n_windows"] == 3
    assert rec["config"]["datasets"] == ["wiki_sample"]
    r = rec["results"]["wiki_sample"]
    assert r["windows"] == 3 and r["tokens"] == 3 * 63 and r["ppl"] > 1 and r["available_windows"] > 3
    assert rec["versions"]["torch"] and rec["versions"]["transformers"]
    assert rec["model"]["kind"] == "local" and rec["model_load_s"] >= 0

    # a second run reuses the file without loading the model
    calls = []
    real_load = run_module.load_model
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: calls.append(1) or real_load(*a, **k))
    assert main_module.main(argv) == 0
    assert calls == []
    assert json.loads(files[0].read_text()) == rec

    # --overwrite recomputes (same numbers: the evaluation is deterministic)
    assert main_module.main(argv + ["--overwrite"]) == 0
    assert calls == [1]
    again = json.loads(files[0].read_text())
    assert again["results"]["wiki_sample"]["ppl"] == pytest.approx(r["ppl"], rel=1e-6)


def test_slug_separates_numeric_settings():
    base = RunConfig(model="m")
    assert base.slug() == RunConfig(model="m", batch_size=4, overwrite=True).slug()
    others = [RunConfig(model="m", seq_len=1024), RunConfig(model="m", n_windows=4),
              RunConfig(model="m", dtype="bfloat16"), RunConfig(model="m", attn_implementation="eager")]
    slugs = {base.slug(), *(c.slug() for c in others)}
    assert len(slugs) == 5


def test_run_config_validates_on_construction():
    with pytest.raises(ValueError, match="--dtype 'float64'"):
        RunConfig(model="m", dtype="float64")
    with pytest.raises(ValueError, match="--seq_len"):
        RunConfig(model="m", seq_len=1)


def test_calibration_flags_shared_by_weight_algorithms(capsys):
    import argparse

    from wkvaq_quant.cli import add_calib_args

    p = argparse.ArgumentParser()
    add_calib_args(p)
    a = p.parse_args([])
    assert (a.calib_dataset, a.n_calib, a.calib_seq_len, a.seed) == ("wiki_sample", 128, 512, 0)
    for bad in (["--n_calib", "0"], ["--calib_seq_len", "-1"], ["--calib_dataset", "pile"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
        assert bad[0] in capsys.readouterr().err


def test_offline_hub_model_fails_at_once(tmp_path, monkeypatch, capsys, no_model_load):
    import time

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    assert main_module.main(main_argv("llama-2-7b", tmp_path)) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "--model 'llama-2-7b' (meta-llama/Llama-2-7b-hf): the Hugging Face hub is not reachable" in err
