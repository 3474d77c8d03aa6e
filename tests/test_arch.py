"""The architecture registry: entries, lookups, and families without an entry refused."""

import json

import pytest
import torch

from wkvaq_quant.arch import ARCHS, UnsupportedModelError, arch_for_config, arch_of
from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.mix_bits import METHODS
from wkvaq_quant.modeling import attach
from wkvaq_quant.models import UnknownModelError, check_model_available, resolve_model
from wkvaq_quant.weights.algo import WEIGHT_ALGOS
from wkvaq_quant.weights.registry import get_weight_algo


def _tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return Qwen3ForCausalLM(cfg).eval()


def test_entries_cover_their_linears():
    for arch in ARCHS.values():
        names = arch.linear_names
        assert sorted(n for g in arch.sequential for n in g) == sorted(names)
        assert set(arch.clip_skip) <= set(names) and arch.pre_rope_key in names


def test_llama_and_mistral_found_by_class_and_by_config():
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    small = dict(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    llama, mistral = LlamaForCausalLM(LlamaConfig(**small)), MistralForCausalLM(MistralConfig(**small))
    assert arch_of(llama).name == "llama" and arch_of(llama.model.layers[0]).name == "llama"
    assert arch_of(mistral).name == "mistral"
    assert arch_for_config({"model_type": "mistral"}).name == "mistral"


def test_qwen3_is_refused_until_it_has_an_entry():
    """q_norm / k_norm sit between k_proj and RoPE: tapping k_proj would quantize the wrong tensor."""
    model = _tiny_qwen3()
    with pytest.raises(UnsupportedModelError, match="supported families: llama .*mistral"):
        attach(model, QuantPlan.from_flags(k_bits=4, v_bits=4))
    with pytest.raises(UnsupportedModelError, match="qwen3"):
        arch_for_config(model.config)


def test_unsupported_checkpoint_refused_before_loading(tmp_path):
    """From config.json alone: no weight file exists here, so nothing could have been loaded."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match="model_type .qwen3. is not supported.*llama"):
        check_model_available(resolve_model(str(tmp_path)))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UnknownModelError, match="cannot read .*config.json as JSON"):
        check_model_available(resolve_model(str(tmp_path)))


def test_main_refuses_an_unsupported_family(tmp_path, capsys):
    from main import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert main(["--model", str(tmp_path), "--k_bits", "4", "--v_bits", "4"]) == 2
    err = capsys.readouterr().err
    assert "model_type 'qwen3' is not supported" in err and "Traceback" not in err


def test_weight_algorithms_registered_with_their_llmc_methods():
    assert WEIGHT_ALGOS == ("rtn", "awq", "gptq")  # uncalibrated first, then by name
    assert sorted(get_weight_algo(a).method for a in WEIGHT_ALGOS) == sorted(METHODS)


def test_awq_front_is_not_installed_as_a_package(tmp_path):
    """Outside the checkout `import awq` finds llm-awq / AutoAWQ, or nothing: never this project."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import importlib.util as u; s = u.find_spec('awq'); print(s.origin if s else '')"
    origin = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            check=True, env={"PATH": "/usr/bin:/bin"}).stdout.strip()
    root = Path(__file__).resolve().parents[1]
    assert not origin or root not in Path(origin).resolve().parents
