"""The architecture registry: entries, lookups, and families without an entry refused."""

import importlib
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
from tests.modeling.conftest import FAMILIES, build_tiny, tiny_config


def _tiny_phi3():
    """A family without an entry (fused qkv_proj / gate_up_proj)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return Phi3ForCausalLM(cfg).eval()


def test_entries_cover_their_linears():
    assert sorted(ARCHS) == sorted(FAMILIES)  # the test matrix runs over every entry
    for arch in ARCHS.values():
        names = arch.linear_names
        assert sorted(n for g in arch.sequential for n in g) == sorted(names)
        assert set(arch.clip_skip) <= set(names)


@pytest.mark.parametrize("family", FAMILIES)
def test_entry_found_by_class_by_config_and_its_modules_exist(family):
    model = build_tiny(family)
    arch = arch_of(model)
    assert arch.name == family and arch_for_config(model.config).name == family
    blocks = arch.decoder_blocks(model)
    assert len(blocks) == 2 and arch_of(blocks[0]) is arch
    for block in blocks:
        assert [lin for *_, lin in arch.block_linears(block)]
        for g in arch.scale_groups:
            block.get_submodule(g.prev)
        arch.attention_of(block).get_submodule(arch.pre_rope_key)


@pytest.mark.parametrize("family", FAMILIES)
def test_pre_rope_key_tap_is_the_cached_key(family):
    """RoPE applied to what the registry's tap emits (in its layout) gives exactly the keys the KV cache
    stores: for Qwen3 / Gemma-3 after k_norm (whose weights are random here), not k_proj's output."""
    from transformers import DynamicCache

    model = build_tiny(family, impl="eager")
    arch = arch_of(model)
    taps, rope = {}, {}
    for i, block in enumerate(arch.decoder_blocks(model)):
        attn = arch.attention_of(block)
        attn.get_submodule(arch.pre_rope_key).register_forward_hook(lambda m, a, o, i=i: taps.__setitem__(i, o))
        attn.register_forward_pre_hook(lambda m, a, kw, i=i: rope.__setitem__(i, kw["position_embeddings"]),
                                       with_kwargs=True)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    modeling = importlib.import_module(arch.modeling)
    for i, out in taps.items():
        k = {"tokens": lambda x: x.view(2, 6, -1, x.shape[-1] // model.config.num_key_value_heads),
             "token_heads": lambda x: x, "heads": lambda x: x.transpose(1, 2)}[arch.pre_rope_key_layout](out)
        k = k.transpose(1, 2)  # [B, Hkv, T, d]
        cos, sin = rope[i]
        want = k * cos.unsqueeze(1) + modeling.rotate_half(k) * sin.unsqueeze(1)
        torch.testing.assert_close(cache.layers[i].keys, want, rtol=0, atol=1e-6)


def test_llama_and_mistral_found_by_class_and_by_config():
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    small = dict(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    llama, mistral = LlamaForCausalLM(LlamaConfig(**small)), MistralForCausalLM(MistralConfig(**small))
    assert arch_of(llama).name == "llama" and arch_of(llama.model.layers[0]).name == "llama"
    assert arch_of(mistral).name == "mistral"
    assert arch_for_config({"model_type": "mistral"}).name == "mistral"


def test_a_family_without_an_entry_is_refused():
    model = _tiny_phi3()
    with pytest.raises(UnsupportedModelError, match="supported families: llama .*mistral.*qwen3.*gemma3"):
        attach(model, QuantPlan.from_flags(k_bits=4, v_bits=4))
    with pytest.raises(UnsupportedModelError, match="phi3"):
        arch_for_config(model.config)


def test_multimodal_gemma3_is_refused():
    """Gemma3PreTrainedModel also covers Gemma3ForConditionalGeneration (model_type gemma3, with a vision
    tower): only the text model gemma3_text has an entry."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=tiny_config("gemma3").to_dict(),
                                                        vision_config=vision.to_dict(), mm_tokens_per_image=4))
    with pytest.raises(UnsupportedModelError, match="model_type 'gemma3'.*covers model_type gemma3_text"):
        attach(model, QuantPlan.from_flags(k_bits=4))
    with pytest.raises(UnsupportedModelError, match="model_type 'gemma3' is not supported"):
        arch_for_config(model.config)


def test_unsupported_checkpoint_refused_before_loading(tmp_path):
    """From config.json alone: no weight file exists here, so nothing could have been loaded."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match="model_type .phi3. is not supported.*llama"):
        check_model_available(resolve_model(str(tmp_path)))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UnknownModelError, match="cannot read .*config.json as JSON"):
        check_model_available(resolve_model(str(tmp_path)))


def test_main_refuses_an_unsupported_family(tmp_path, capsys):
    from main import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    assert main(["--model", str(tmp_path), "--k_bits", "4", "--v_bits", "4"]) == 2
    err = capsys.readouterr().err
    assert "model_type 'phi3' is not supported" in err and "Traceback" not in err


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
