"""Layer-wise quantization from safetensors shards: equal to in-memory RTN / GPTQ bit for bit, an
interrupted run resumes to the same bytes, one block resident at a time, bad inputs refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.conftest import make_tiny_checkpoint
from wkvaq_quant.config import QuantPlan
from wkvaq_quant.mix_bits import LayerMap, LayerTarget, MixSetting
from wkvaq_quant.weights import layerwise as lw
from wkvaq_quant.weights.algo import WeightAlgo
from wkvaq_quant.weights.gptq import GptqConfig, gptq_quantize
from wkvaq_quant.weights.layerwise import STATE_FILE, quantize_layer_wise
from wkvaq_quant.weights.rtn import rtn_quantize

PLAN = QuantPlan.from_flags(w_bits=4, w_group_size=16)
OFF = LayerMap((MixSetting(name="keep", targets=(LayerTarget("down_proj", (1,)), LayerTarget("q_proj", (0,))),
                           do_quant=False),))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("lw-src"))


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tiny Llama with tied embeddings, stored in two shards (index json)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     tie_word_embeddings=True))
    path = tmp_path_factory.mktemp("lw-tied")
    m.save_pretrained(path, max_shard_size="100KB")
    assert (path / lw.INDEX_FILE).is_file()
    return path


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(0))


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _algo(name, **gptq):
    return WeightAlgo(name, gptq=GptqConfig(**gptq))


@pytest.mark.parametrize("ckpt", ["src", "tied"])
@pytest.mark.parametrize("layers", [None, OFF], ids=["plain", "mix"])
def test_rtn_layer_wise_equals_in_memory(request, tmp_path, ckpt, layers):
    path = request.getfixturevalue(ckpt)
    plan = dataclasses.replace(PLAN, layers=layers)
    quantize_layer_wise(path, tmp_path / "out", plan, WeightAlgo("rtn"), progress=False, log=lambda s: None)
    ref = _load(path)
    rtn_quantize(ref, plan)
    _assert_same_weights(_load(tmp_path / "out"), ref)
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("ckpt", ["src", "tied"])
@pytest.mark.parametrize("nxt", ["quantized", "fp"])
def test_gptq_layer_wise_equals_in_memory(request, tmp_path, ids, ckpt, nxt):
    path = request.getfixturevalue(ckpt)
    plan = dataclasses.replace(PLAN, layers=OFF)
    algo = _algo("gptq", next_inputs=nxt, act_order=True)
    quantize_layer_wise(path, tmp_path / "out", plan, algo, calib=ids, progress=False, log=lambda s: None)
    ref = _load(path)
    gptq_quantize(ref, plan, ids, algo.gptq, progress=False)
    _assert_same_weights(_load(tmp_path / "out"), ref)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("algo", [_algo("rtn"), _algo("gptq"), _algo("gptq", next_inputs="fp")],
                         ids=["rtn", "gptq", "gptq-fp"])
@pytest.mark.parametrize("kill_after", [1, 2])
def test_kill_and_resume_gives_the_same_bytes(tied, tmp_path, ids, monkeypatch, algo, kill_after):
    calib = ids if algo.needs_calib else None
    quantize_layer_wise(tied, tmp_path / "whole", PLAN, algo, calib=calib, progress=False, log=lambda s: None)
    real = lw._write_block
    written = []

    def dying(sk, i, out):
        if len(written) == kill_after:
            raise _Killed
        written.append(i)
        return real(sk, i, out)

    monkeypatch.setattr(lw, "_write_block", dying)
    with pytest.raises(_Killed):
        quantize_layer_wise(tied, tmp_path / "resumed", PLAN, algo, calib=calib, progress=False, log=lambda s: None)
    state = json.loads((tmp_path / "resumed" / STATE_FILE).read_text())
    assert state["done"] == list(range(kill_after)) and not state["complete"]
    monkeypatch.setattr(lw, "_write_block", lambda sk, i, out: written.append(i) or real(sk, i, out))
    quantize_layer_wise(tied, tmp_path / "resumed", PLAN, algo, calib=calib, progress=False, log=lambda s: None)
    assert written == [0, 1, 2][: kill_after] + [0, 1, 2][kill_after:]  # finished blocks are not redone
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_one_block_resident_at_a_time(tied, tmp_path, ids, monkeypatch):
    real = lw._write_block
    resident = []

    def counting(sk, i, out):
        resident.append(sum(not next(b.parameters()).is_meta for b in sk.blocks))
        return real(sk, i, out)

    monkeypatch.setattr(lw, "_write_block", counting)
    quantize_layer_wise(tied, tmp_path / "out", PLAN, _algo("gptq"), calib=ids, progress=False, log=lambda s: None)
    assert resident == [1, 1, 1]


def test_bad_inputs_are_refused(tied, src, tmp_path, ids):
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "config.json").write_text((src / "config.json").read_text())
    torch.save(_load(src).state_dict(), bin_only / "pytorch_model.bin")
    with pytest.raises(ValueError, match="reads safetensors shards; .* has none \\(found pytorch_model.bin\\)"):
        quantize_layer_wise(bin_only, tmp_path / "o1", PLAN, WeightAlgo("rtn"), progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in tied.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ValueError, match=f"names shard\\(s\\) missing from .*: {shard.name}"):
        quantize_layer_wise(broken, tmp_path / "o2", PLAN, WeightAlgo("rtn"), progress=False)
    out = tmp_path / "o3"
    quantize_layer_wise(tied, out, PLAN, WeightAlgo("rtn"), progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="holds a layer-wise run with other settings \\(differing: plan\\)"):
        quantize_layer_wise(tied, out, QuantPlan.from_flags(w_bits=3, w_group_size=16), WeightAlgo("rtn"),
                            progress=False)
    with pytest.raises(ValueError, match="differing: weight_algo"):
        quantize_layer_wise(tied, out, PLAN, _algo("gptq"), calib=ids, progress=False)
    other = tmp_path / "o4"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is not empty and holds no layer-wise run"):
        quantize_layer_wise(tied, other, PLAN, WeightAlgo("rtn"), progress=False)
    with pytest.raises(ValueError, match="needs calibration windows"):
        quantize_layer_wise(tied, tmp_path / "o5", PLAN, _algo("gptq"), progress=False)
