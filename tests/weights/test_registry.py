"""The weight-algorithm registry: a new algorithm is one registration, seen by --weight_algo,
the result name and main.py's run, with nothing else edited."""

import torch

from main import main
from tests.helpers import main_argv
from wkvaq_quant.cli import parse_config
from wkvaq_quant.weights import registry
from wkvaq_quant.weights.registry import AlgoSpec, register_weight_algo, without_weights

BASE = ["--datasets", "wiki_sample", "--n_windows", "1", "--seq_len", "64", "--w_bits", "4", "--w_group_size", "16"]


def test_a_fourth_algorithm_is_one_registration(tiny_llama, tmp_path, monkeypatch, isolated_cache):
    monkeypatch.setattr(registry, "_ALGOS", dict(registry._ALGOS))  # leave the real registry as it was
    calls = []

    def run(model, plan, algo, calib, device, progress):  # "zero every weight", so its effect is visible
        calls.append(algo.name)
        with torch.no_grad():
            for p in model.model.layers.parameters():
                p.zero_()
        return without_weights(plan)

    register_weight_algo(AlgoSpec(name="zero", method="Zero", needs_calib=False, run=run, slug=lambda a: "zero"))
    cfg = parse_config(main_argv(tiny_llama, tmp_path, *BASE, "--weight_algo", "zero"))
    assert cfg.weight_algo.spec.name == "zero" and "zero" in cfg.slug()
    assert main(main_argv(tiny_llama, tmp_path, *BASE, "--weight_algo", "zero")) == 0
    assert calls == ["zero"]


def test_two_algorithms_cannot_share_an_llmc_method(monkeypatch):
    monkeypatch.setattr(registry, "_ALGOS", dict(registry._ALGOS))
    import pytest

    with pytest.raises(ValueError, match="quant.method 'Gptq' already selects --weight_algo gptq"):
        register_weight_algo(AlgoSpec(name="gptq2", method="Gptq", needs_calib=False, run=lambda *a: a[1]))
