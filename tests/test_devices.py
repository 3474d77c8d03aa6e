"""--device_map / --max_memory: values parsed, refused without CUDA or past the GPUs present, and a
device map reaching from_pretrained (an all-CPU map evaluates as the plain load does)."""

from __future__ import annotations

import json

import pytest

from wkvaq_quant.devices import check_device_map, parse_device_map, parse_max_memory


@pytest.mark.parametrize("text, expected", [
    ("auto", "auto"), ("balanced", "balanced"), ("sequential", "sequential"),
    ('{"model.embed_tokens": 0, "model.layers": "cuda:1", "lm_head": "cpu"}',
     {"model.embed_tokens": 0, "model.layers": 1, "lm_head": "cpu"}),
])
def test_device_maps_parse(text, expected):
    assert parse_device_map(text) == expected


def test_device_map_from_a_file(tmp_path):
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"": 0}))
    assert parse_device_map(str(f)) == {"": 0}


@pytest.mark.parametrize("text, words", [
    ("everywhere", "allowed values are auto"), ("{}", "non-empty"), ('{"a": -1}', "device -1"),
    ('{"a": true}', "device True"), ("[0, 1]", "allowed values"),
])
def test_bad_device_maps(text, words):
    with pytest.raises(ValueError, match=words):
        parse_device_map(text)


def test_max_memory_parses():
    assert parse_max_memory("0=40GiB, 1=38.5GB,cpu=100GiB") == {0: "40GiB", 1: "38.5GB", "cpu": "100GiB"}
    for bad in ("0=lots", "40GiB", "", "tpu=1GiB"):
        with pytest.raises(ValueError, match="--max_memory"):
            parse_max_memory(bad)


def test_device_map_needs_cuda_and_the_gpus_it_names():
    with pytest.raises(ValueError, match="--device cuda"):
        check_device_map("auto", None, "cpu", 0)
    with pytest.raises(ValueError, match="no CUDA device"):
        check_device_map("auto", None, "cuda", 0)
    with pytest.raises(ValueError, match="names GPU 2, but only 2"):
        check_device_map({"model": 2}, None, "cuda", 2)
    with pytest.raises(ValueError, match="--max_memory names GPU 1"):
        check_device_map("auto", {1: "1GiB"}, "cuda", 1)
    check_device_map({"model": 1, "lm_head": "cpu"}, {0: "1GiB", "cpu": "2GiB"}, "cuda", 2)


def test_a_device_map_reaches_from_pretrained_and_evaluates_the_same(tiny_llama, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from wkvaq_quant.eval.ppl import evaluate_perplexity
    from wkvaq_quant.modeling import attach
    from wkvaq_quant.models import ModelSource, load_model
    from wkvaq_quant.plan import QuantPlan

    source = ModelSource("t", "local", str(tiny_llama), True)
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    plan = QuantPlan.from_flags(w_bits=4, w_group_size=16, a_bits=8, k_bits=4, v_bits=4)
    out, seen = [], []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("device_map", "max_memory")})
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    for kw in ({}, {"device_map": {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu",
                                   "model.rotary_emb": "cpu", "lm_head": "cpu"}}):
        model, _ = load_model(source, **kw)
        assert seen[-1]["device_map"] == kw.get("device_map")
        attach(model, plan, keep_originals=False)
        out.append(evaluate_perplexity(model, ids, progress=False).nll_sum)
    assert out[0] == out[1]
