"""Block-streamed evaluation (--stream_blocks) equals the in-memory evaluation: the same NLL sum to
the last bit on CPU, for a tiny model of every family and a matrix of W / A / Q / K / V / P settings; the
same result file through main.py; one block in memory at a time; resumable when offloaded."""

from __future__ import annotations

import json

import pytest
import torch

import main as main_module
from tests.helpers import main_argv
from tests.modeling.conftest import FAMILIES
from wkvaq_quant.eval import stream as stream_module
from wkvaq_quant.eval.ppl import evaluate_perplexity
from wkvaq_quant.eval.stream import STREAM_STATE, StreamBatch, stream_perplexity
from wkvaq_quant.modeling import attach
from wkvaq_quant.models import ModelSource, load_model
from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.run import stream_dir

SETTINGS = {
    "fp": {},
    "w4-int": dict(w_bits=4, w_group_size=16),
    "w3-bitmod": dict(w_bits=3, w_group_size=16, w_dtype="bitmod"),
    "w4a8-q8-kv4-kscale-kbias": dict(w_bits=4, w_group_size=16, a_bits=8, q_bits=8, k_bits=4, v_bits=4,
                                     k_group_size=16, v_group_size=16, apply_k_scale=True, apply_k_bias=True),
    "kv4-post-rope-r8-per-query": dict(k_bits=4, v_bits=4, k_group_size=16, v_group_size=16, k_quant_post_rope=True,
                                       kv_residual_len=8, kv_residual_mode="per_query"),
    "kcvt-r16-p8": dict(k_bits=2, v_bits=2, v_group_size=32, k_group_size=16, kv_quant_method="KCVT",
                        kv_residual_len=16, p_bits=8),
    "a8-int": dict(a_bits=8, a_dtype="int"),
}


def _ids(n: int = 5, seq: int = 48) -> torch.Tensor:
    return torch.randint(3, 300, (n, seq), generator=torch.Generator().manual_seed(1))


def _batches(ids: torch.Tensor, bs: int, name: str = "x") -> list[StreamBatch]:
    return [StreamBatch(name, ids[b: b + bs]) for b in range(0, ids.shape[0], bs)]


def _in_memory(ckpt, plan: QuantPlan, ids, bs: int, attn: str, dtype: str = "float32"):
    model, _ = load_model(ModelSource("t", "local", str(ckpt), True), dtype, "cpu", attn)
    if not plan.is_full_precision:
        attach(model, plan, keep_originals=False)
    return evaluate_perplexity(model, ids, bs, progress=False)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_streamed_equals_in_memory_bit_for_bit(request, arch, attn, name):
    ckpt = request.getfixturevalue(f"tiny_{arch}")
    plan, ids = QuantPlan.from_flags(**SETTINGS[name]), _ids()
    ref = _in_memory(ckpt, plan, ids, 2, attn)
    got = stream_perplexity(ckpt, plan, _batches(ids, 2), {"x": ids.shape[0]}, attn_implementation=attn,
                            progress=False, log=lambda m: None)["x"]
    assert got.nll_sum == ref.nll_sum and got.ppl == ref.ppl
    assert (got.windows, got.tokens, got.seq_len) == (ref.windows, ref.tokens, ref.seq_len)


def test_bfloat16_streamed_equals_in_memory(tiny_llama):
    plan, ids = QuantPlan.from_flags(**SETTINGS["w4a8-q8-kv4-kscale-kbias"]), _ids(3)
    ref = _in_memory(tiny_llama, plan, ids, 1, "sdpa", "bfloat16")
    got = stream_perplexity(tiny_llama, plan, _batches(ids, 1), {"x": 3}, dtype=torch.bfloat16, progress=False,
                            log=lambda m: None)["x"]
    assert got.nll_sum == ref.nll_sum


def test_streamed_quantization_would_be_seen(tiny_llama):
    """The equality above is not vacuous: the quantized plan changes the NLL, streamed too."""
    ids = _ids(2)
    fp, w4 = (stream_perplexity(tiny_llama, QuantPlan.from_flags(**SETTINGS[k]), _batches(ids, 2), {"x": 2},
                                progress=False, log=lambda m: None)["x"].nll_sum for k in ("fp", "w3-bitmod"))
    assert fp != w4


def _read_result(tmp_path) -> dict:
    (path,) = (tmp_path / "results").rglob("*.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("extra", [[], ["--offload_activations"]])
def test_main_stream_blocks_writes_the_in_memory_result(tiny_llama, tmp_path, isolated_cache, extra):
    """Through main.py, with a mix_bits map (per-block KV bits and weights) and two datasets'
    worth of batches: the same slug and perplexity as the in-memory run."""
    yml = tmp_path / "map.yml"
    yml.write_text("quant:\n  method: RTN\n  weight: {bit: 4, granularity: per_group, group_size: 16}\n"
                   "  act: {bit: 8, granularity: per_token}\n  mix_bits:\n    s:\n      layer_name: [k_proj#1]\n"
                   "      k_bits: 8\n      v_bits: 8\n    d:\n      layer_name: [down_proj#0]\n"
                   "      weight: {bit: 8, group_size: 16}\n")
    flags = ["--config", str(yml), "--k_bits", "4", "--v_bits", "4", "--k_group_size", "16", "--seq_len", "48",
             "--n_windows", "5", "--batch_size", "2"]
    assert main_module.main(main_argv(tiny_llama, tmp_path / "mem", *flags)) == 0
    assert main_module.main(main_argv(tiny_llama, tmp_path / "str", *flags, "--stream_blocks", *extra)) == 0
    mem, st = _read_result(tmp_path / "mem"), _read_result(tmp_path / "str")
    assert st["slug"] == mem["slug"]
    assert st["results"]["wiki_sample"]["ppl"] == mem["results"]["wiki_sample"]["ppl"]
    assert st["results"]["wiki_sample"]["nll_sum"] == mem["results"]["wiki_sample"]["nll_sum"]
    assert st["layer_bits"] == mem["layer_bits"] and st["config"]["stream_blocks"]
    assert not any(p.name.endswith(".stream") for p in (tmp_path / "str" / "results").rglob("*"))  # cleaned up


def test_streaming_a_layer_wise_checkpoint_equals_loading_it(tiny_mistral, tmp_path, isolated_cache):
    """W from a quantized checkpoint (written by --layer_wise), activations and KV at evaluation."""
    q = tmp_path / "q"
    assert main_module.main(main_argv(tiny_mistral, tmp_path, "--w_bits", "4", "--w_group_size", "16",
                                      "--layer_wise", "--save_quant", str(q))) == 0
    flags = ["--a_bits", "8", "--k_bits", "4", "--v_bits", "4", "--seq_len", "48", "--n_windows", "3"]
    assert main_module.main(main_argv(q, tmp_path / "mem", *flags)) == 0
    assert main_module.main(main_argv(q, tmp_path / "str", *flags, "--stream_blocks")) == 0
    assert _read_result(tmp_path / "str")["results"]["wiki_sample"]["nll_sum"] == \
        _read_result(tmp_path / "mem")["results"]["wiki_sample"]["nll_sum"]


def test_one_block_in_memory_and_one_batch_of_logits_at_a_time(tiny_llama, monkeypatch):
    """While a block runs, every other block is on the meta device; the head sees one batch."""
    plan, ids = QuantPlan.from_flags(**SETTINGS["w4-int"]), _ids(5)
    seen, head_rows = [], []
    real_assign = stream_module._assign_block

    def assign(sk, i, tensors):
        real_assign(sk, i, tensors)
        seen.append([not next(b.parameters()).is_meta for b in sk.blocks])

    monkeypatch.setattr(stream_module, "_assign_block", assign)
    from transformers import LlamaForCausalLM

    real_forward = LlamaForCausalLM.forward

    def forward(self, *args, **kwargs):
        self.lm_head.register_forward_hook(lambda m, i, o: head_rows.append(tuple(i[0].shape[:2])))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    stream_perplexity(tiny_llama, plan, _batches(ids, 2), {"x": 5}, progress=False, log=lambda m: None)
    assert seen == [[True, False], [False, True]]
    assert sorted(set(head_rows)) == [(1, 48), (2, 48)]  # batches of 2, 2 and 1 windows: never all 5


class _Killed(Exception):
    pass


def _killed_at_block_1(tiny, plan, ids, off, monkeypatch, logs) -> None:
    """An offloaded run into `off` that dies when block 1 is read (after block 0 finished)."""
    real_assign = stream_module._assign_block

    def dying(sk, i, tensors):
        if i == 1:
            raise _Killed
        real_assign(sk, i, tensors)

    monkeypatch.setattr(stream_module, "_assign_block", dying)
    with pytest.raises(_Killed):
        stream_perplexity(tiny, plan, _batches(ids, 1), {"x": ids.shape[0]}, progress=False, offload_dir=off,
                          settings={"k": 1}, log=logs.append)
    monkeypatch.setattr(stream_module, "_assign_block", real_assign)


def test_offloaded_run_resumes_after_a_kill(tiny_llama, tmp_path, monkeypatch):
    """Killed while block 1 runs: the rerun starts from block 0's kept outputs (block 0 is not read
    again) and gives the same NLL as an uninterrupted run."""
    plan, ids = QuantPlan.from_flags(**SETTINGS["w4a8-q8-kv4-kscale-kbias"]), _ids(3)
    ref = stream_perplexity(tiny_llama, plan, _batches(ids, 1), {"x": 3}, progress=False, log=lambda m: None)["x"]
    off, logs, assigned = tmp_path / "off", [], []
    real_assign = stream_module._assign_block
    _killed_at_block_1(tiny_llama, plan, ids, off, monkeypatch, logs)
    state = json.loads((off / STREAM_STATE).read_text())
    assert state["blocks_done"] == 1 and len(list((off / state["generation"]).glob("*.pt"))) == 3

    def counting(sk, i, tensors):
        assigned.append(i)
        real_assign(sk, i, tensors)

    monkeypatch.setattr(stream_module, "_assign_block", counting)
    got = stream_perplexity(tiny_llama, plan, _batches(ids, 1), {"x": 3}, progress=False, offload_dir=off,
                            settings={"k": 1}, log=logs.append)["x"]
    assert assigned == [1] and any("resuming after block 0" in m for m in logs)
    assert got.nll_sum == ref.nll_sum and not off.exists()


def test_offloaded_state_of_other_settings_is_not_reused(tiny_llama, tmp_path, monkeypatch):
    ids, off, logs = _ids(2), tmp_path / "off", []
    _killed_at_block_1(tiny_llama, QuantPlan.from_flags(**SETTINGS["w4-int"]), ids, off, monkeypatch, logs)
    other = QuantPlan.from_flags(w_bits=3, w_group_size=16)
    got = stream_perplexity(tiny_llama, other, _batches(ids, 1), {"x": 2}, progress=False, offload_dir=off,
                            settings={"k": 2}, log=logs.append)["x"]
    assert any("other settings; starting over" in m for m in logs)
    assert got.nll_sum == _in_memory(tiny_llama, other, ids, 1, "sdpa").nll_sum


def test_stream_dir_sits_next_to_the_result_file(tmp_path):
    path = tmp_path / "m" / "w4-float32-seq48-abc.json"
    assert stream_dir(path) == tmp_path / "m" / ".w4-float32-seq48-abc.stream"


def test_a_model_that_changes_hidden_states_between_blocks_is_refused(tiny_llama, monkeypatch):
    """Streaming assumes block i+1 receives what block i returned; a model that does something in
    between is refused rather than evaluated wrongly."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    from transformers.models.llama import modeling_llama

    def call(self, *args, **kwargs):  # every block's output doubled on its way to the next one
        return GradientCheckpointingLayer.__call__(self, *args, **kwargs) * 2

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "__call__", call)
    with pytest.raises(ValueError, match="changes the hidden states between decoder blocks 0 and 1"):
        stream_perplexity(tiny_llama, QuantPlan(), _batches(_ids(1), 1), {"x": 1}, progress=False,
                          log=lambda m: None)
