"""Shared fixtures: tiny random-weight Llama/Mistral checkpoints with a small BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog.\n\n= Heading =\nAnarchism is a political philosophy. "
    "Numbers 1234567890, punctuation (a, b; c) and  double  spaces.\n"
) * 20


def _train_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([TINY_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_tiny_checkpoint(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    """Save a tiny random model (GQA: 4 query heads, 2 KV heads; the other families as in
    tests/modeling/conftest.py's tiny_config) and tokenizer to `path`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from tests.modeling.conftest import randomize_offsets, tiny_config

    tok = _train_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    else:  # Qwen2 / Qwen3 / Gemma-3 (tied embeddings), with random biases and norms
        model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=len(tok), max_position_embeddings=4096,
                                                             bos_token_id=1, eos_token_id=2, pad_token_id=0))
        randomize_offsets(model)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _checkpoint_fixture(arch: str):
    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory) -> Path:
        return make_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{arch}"), arch)

    fixture.__doc__ = f"A tiny random {arch} checkpoint with a small BPE tokenizer."
    return fixture


tiny_llama = _checkpoint_fixture("llama")
tiny_mistral = _checkpoint_fixture("mistral")
tiny_qwen2 = _checkpoint_fixture("qwen2")
tiny_qwen3 = _checkpoint_fixture("qwen3")
tiny_gemma3 = _checkpoint_fixture("gemma3")

FAMILY_CHECKPOINTS = ["tiny_qwen2", "tiny_qwen3", "tiny_gemma3"]
"""Fixture names of the tiny checkpoints beyond Llama / Mistral, for tests parametrized by checkpoint."""


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("wkvaq-cache")


@pytest.fixture
def isolated_cache(_session_cache, monkeypatch) -> Path:
    """Point $WKVAQ_CACHE at a per-session directory (token caches of tiny tokenizers)."""
    monkeypatch.setenv("WKVAQ_CACHE", str(_session_cache))
    return _session_cache


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model gets loaded: bad input must be refused before that."""
    from wkvaq_quant import run as run_module

    def forbidden(*args, **kwargs):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(run_module, "load_model", forbidden)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): tests of many tiny ops slow down ~100x
    when two threads share oversubscribed cores. Directories opt in from their conftest."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
