"""Layer-wise quantization from safetensors shards: equal to in-memory RTN / GPTQ bit for bit, an
interrupted run resumes to the same bytes, one block resident at a time, bad inputs refused."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from tests.conftest import FAMILY_CHECKPOINTS, make_tiny_checkpoint
from wkvaq_quant.config import QuantArgs
from wkvaq_quant.plan import LayerMap, LayerTarget, MixSetting, QuantPlan
from wkvaq_quant.weights import layerwise as lw, safetensors_io as sio
from wkvaq_quant.weights.awq.pre_quant import run_awq
from wkvaq_quant.weights.algo import WeightAlgo
from wkvaq_quant.weights.awq.settings import AwqSearchConfig
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


AWQ = WeightAlgo("awq", awq=AwqSearchConfig(n_grid=5, n_sample_token=16))


PER_TENSOR = dataclasses.replace(PLAN, w=QuantArgs(bits=4, target="weight", granularity="per_tensor"))


@pytest.mark.parametrize("ckpt", ["src", "tied", *FAMILY_CHECKPOINTS])
@pytest.mark.parametrize("plan", [PLAN, dataclasses.replace(PLAN, layers=OFF), PER_TENSOR],
                         ids=["plain", "mix", "per_tensor"])
@pytest.mark.parametrize("chunk", [None, 200], ids=["whole", "chunked"])
def test_rtn_layer_wise_equals_in_memory(request, tmp_path, monkeypatch, ckpt, plan, chunk):
    """Streamed in row chunks of ~200 bytes (a few rows; per_tensor weights whole) or whole tensors."""
    path = request.getfixturevalue(ckpt)
    if chunk is not None:
        monkeypatch.setattr(sio, "CHUNK_BYTES", chunk)
    quantize_layer_wise(path, tmp_path / "out", plan, WeightAlgo("rtn"), progress=False, log=lambda s: None)
    ref = _load(path)
    rtn_quantize(ref, plan)
    _assert_same_weights(_load(tmp_path / "out"), ref)
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("ckpt", ["src", "tied", *FAMILY_CHECKPOINTS])
@pytest.mark.parametrize("nxt", ["quantized", "fp"])
def test_gptq_layer_wise_equals_in_memory(request, tmp_path, ids, ckpt, nxt):
    path = request.getfixturevalue(ckpt)
    plan = dataclasses.replace(PLAN, layers=OFF)
    algo = _algo("gptq", next_inputs=nxt, act_order=True)
    quantize_layer_wise(path, tmp_path / "out", plan, algo, calib=ids, progress=False, log=lambda s: None)
    ref = _load(path)
    gptq_quantize(ref, plan, ids, algo.gptq, progress=False)
    _assert_same_weights(_load(tmp_path / "out"), ref)


def test_gptq_single_pass_layer_wise_equals_in_memory_and_resumes_either_way(tied, tmp_path, ids):
    """Layer-wise GPTQ with the single pass writes the per-group passes' weights; the flag is not
    part of the run's settings, so the same directory is accepted without it."""
    plan = dataclasses.replace(PLAN, layers=OFF)
    out = tmp_path / "out"
    quantize_layer_wise(tied, out, plan, _algo("gptq", single_pass=True), calib=ids, progress=False,
                        log=lambda s: None)
    ref = _load(tied)
    gptq_quantize(ref, plan, ids, GptqConfig(), progress=False)
    _assert_same_weights(_load(out), ref)
    said = []
    state = quantize_layer_wise(tied, out, plan, _algo("gptq"), calib=ids, progress=False, log=said.append)
    assert state["complete"] and "already complete" in said[0]


@pytest.mark.parametrize("ckpt", ["src", "tied", *FAMILY_CHECKPOINTS])
@pytest.mark.parametrize("search_dtype", ["model", "bfloat16"])
def test_awq_layer_wise_equals_in_memory(request, tmp_path, ids, ckpt, search_dtype):
    """Layer-wise AWQ (search, fold, clip, RTN per block) == run_awq on the whole model + RTN."""
    path = request.getfixturevalue(ckpt)
    plan = dataclasses.replace(PLAN, layers=OFF)
    algo = dataclasses.replace(AWQ, awq=dataclasses.replace(AWQ.awq, search_dtype=search_dtype))
    quantize_layer_wise(path, tmp_path / "out", plan, algo, calib=ids, progress=False, log=lambda s: None)
    ref = _load(path)
    a = algo.awq
    cache = run_awq(ref, plan, ids, "x", n_grid=a.n_grid, max_shrink=a.max_shrink, n_sample_token=a.n_sample_token,
                    progress=False, search_dtype=search_dtype)
    assert cache["scale"] and cache["clip"]  # the search did change the model
    rtn_quantize(ref, plan)
    _assert_same_weights(_load(tmp_path / "out"), ref)


def test_activation_aware_awq_layer_wise_equals_in_memory(tied, tmp_path, ids):
    """With an activation setting (llmc's Awq with act), layer-wise AWQ searches on the quantized inputs as
    run_awq does in memory, and the weights differ from the weight-only search's."""
    plan = dataclasses.replace(PLAN, a=QuantPlan.from_flags(a_bits=4, a_dtype="int").a)
    quantize_layer_wise(tied, tmp_path / "act", plan, AWQ, calib=ids, progress=False, log=lambda s: None)
    ref = _load(tied)
    a = AWQ.awq
    run_awq(ref, plan, ids, "x", n_grid=a.n_grid, max_shrink=a.max_shrink, n_sample_token=a.n_sample_token,
            progress=False)
    rtn_quantize(ref, plan)
    _assert_same_weights(_load(tmp_path / "act"), ref)
    w_only = _load(tied)
    run_awq(w_only, plan, ids, "x", n_grid=a.n_grid, max_shrink=a.max_shrink, n_sample_token=a.n_sample_token,
            progress=False, weight_only_search=True)
    rtn_quantize(w_only, plan)
    assert any(not torch.equal(x, y) for x, y in zip(w_only.state_dict().values(), ref.state_dict().values()))


class _Killed(Exception):
    pass


@pytest.mark.parametrize("algo", [_algo("rtn"), _algo("gptq"), _algo("gptq", next_inputs="fp"), AWQ],
                         ids=["rtn", "gptq", "gptq-fp", "awq"])
@pytest.mark.parametrize("kill_after", [1, 2])
def test_kill_and_resume_gives_the_same_bytes(tied, tmp_path, ids, monkeypatch, algo, kill_after):
    calib = ids if algo.needs_calib else None
    quantize_layer_wise(tied, tmp_path / "whole", PLAN, algo, calib=calib, progress=False, log=lambda s: None)
    written = _interrupted(tied, tmp_path / "resumed", algo, calib, monkeypatch, kill_after)
    state = json.loads((tmp_path / "resumed" / STATE_FILE).read_text())
    assert state["done"] == list(range(kill_after)) and not state["complete"]
    quantize_layer_wise(tied, tmp_path / "resumed", PLAN, algo, calib=calib, progress=False, log=lambda s: None)
    assert written == [0, 1, 2][kill_after:]  # finished blocks are not redone
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def _count_resident(monkeypatch):
    """Per block written: how many decoder blocks hold real (not meta) weights, and whether the
    embeddings do."""
    real = lw._write_block
    resident = []

    def counting(sk, i, out, *rest):
        embed = sk.model.get_input_embeddings().weight
        resident.append((sum(not next(b.parameters()).is_meta for b in sk.blocks), not embed.is_meta))
        return real(sk, i, out, *rest)

    monkeypatch.setattr(lw, "_write_block", counting)
    return resident


@pytest.mark.parametrize("algo", [_algo("gptq"), AWQ], ids=["gptq", "awq"])
def test_calibrated_runs_hold_one_block_at_a_time(tied, tmp_path, ids, monkeypatch, algo):
    resident = _count_resident(monkeypatch)
    quantize_layer_wise(tied, tmp_path / "out", PLAN, algo, calib=ids, progress=False, log=lambda s: None)
    assert resident == [(1, False)] * 3  # the embeddings are released once block 0's inputs are captured


def test_rtn_streams_row_chunks_and_holds_no_block(src, tmp_path, monkeypatch):
    """RTN never builds a block: every tensor is read in pieces of at most CHUNK_BYTES (or one
    row), quantized and written before the next is read."""
    monkeypatch.setattr(sio, "CHUNK_BYTES", 512)
    resident = _count_resident(monkeypatch)
    real_read, reads = lw.read_rows, []

    def reading(entry, start=0, stop=None):
        t = real_read(entry, start, stop)
        reads.append((entry.name, t.numel() * t.element_size(), entry.row_bytes))
        return t

    monkeypatch.setattr(lw, "read_rows", reading)
    quantize_layer_wise(src, tmp_path / "out", PLAN, WeightAlgo("rtn"), progress=False, log=lambda s: None)
    n_blocks = len(resident)
    assert resident == [(0, False)] * n_blocks
    assert all(size <= max(512, row) for _, size, row in reads)
    ckpt = lw.SafetensorsCheckpoint(src)
    read_bytes = {}
    for name, size, _ in reads:
        read_bytes[name] = read_bytes.get(name, 0) + size
    assert read_bytes == {k: e.nbytes for k, e in ckpt.entries.items()}  # every tensor read once, in full
    assert max(e.nbytes for e in ckpt.entries.values()) > 4 * 512  # so chunking really happened


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
    with pytest.raises(ValueError, match="--offload_activations: --weight_algo rtn uses no calibration activations"):
        quantize_layer_wise(tied, tmp_path / "o6", PLAN, WeightAlgo("rtn"), offload_activations=True, progress=False)
    with pytest.raises(ValueError, match="--offload_activations with --gptq_single_pass"):
        quantize_layer_wise(tied, tmp_path / "o7", PLAN, _algo("gptq", single_pass=True), calib=ids,
                            offload_activations=True, progress=False)
    assert not (tmp_path / "o7").exists()  # refused before anything is written


@pytest.mark.parametrize("nxt", ["quantized", "fp"])
def test_offloaded_activations_give_the_same_bytes(tied, tmp_path, ids, monkeypatch, nxt):
    """--offload_activations: the block inputs live in files (one generation of one file per
    batch while a block is written), the checkpoint is byte-identical, the files are removed."""
    algo = _algo("gptq", next_inputs=nxt)
    quantize_layer_wise(tied, tmp_path / "mem", PLAN, algo, calib=ids, progress=False, log=lambda s: None)
    real, seen = lw._write_block, []

    def watching(sk, i, out, *rest):
        gens = sorted((out / lw.ACTIVATIONS_DIR).iterdir())
        seen.append([len(list(g.glob("*.pt"))) for g in gens])
        return real(sk, i, out, *rest)

    monkeypatch.setattr(lw, "_write_block", watching)
    quantize_layer_wise(tied, tmp_path / "disk", PLAN, algo, calib=ids, progress=False, offload_activations=True,
                        log=lambda s: None)
    assert seen == [[ids.shape[0]]] * 3
    assert not (tmp_path / "disk" / lw.ACTIVATIONS_DIR).exists()
    files = sorted(p.name for p in (tmp_path / "mem").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "disk").iterdir())
    for name in files:
        assert (tmp_path / "mem" / name).read_bytes() == (tmp_path / "disk" / name).read_bytes(), name


@pytest.mark.parametrize("plan", [PLAN, QuantPlan.from_flags(w_bits=3, w_group_size=16, w_dtype="bitmod")],
                         ids=["int4", "bitmod3"])
def test_rtn_layer_wise_bfloat16_chunks_equal_in_memory(src, tmp_path, monkeypatch, plan):
    """In the checkpoint's own 16-bit dtype too (the usual large-model case), chunked streaming
    equals quantizing the loaded model."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(sio, "CHUNK_BYTES", 300)
    quantize_layer_wise(src, tmp_path / "out", plan, WeightAlgo("rtn"), dtype=torch.bfloat16, progress=False,
                        log=lambda s: None)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    rtn_quantize(ref, plan)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert next(got.parameters()).dtype == torch.bfloat16
    _assert_same_weights(got, ref)


# --- damaged shards, stale temporary files, the lock --------------------------------------------------


def _files(path):
    """{name: bytes} of a checkpoint directory (the lock file, which is not part of it, left out)."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file() and p.name != lw.LOCK_FILE}


def _interrupted(src, out, algo, calib, monkeypatch, kill_after):
    """A run into `out` killed after `kill_after` blocks; restores _write_block and returns a list
    that collects the blocks written from then on."""
    real, written = lw._write_block, []

    def dying(sk, i, o, *rest):
        if len(written) == kill_after:
            raise _Killed
        written.append(i)
        return real(sk, i, o, *rest)

    monkeypatch.setattr(lw, "_write_block", dying)
    with pytest.raises(_Killed):
        quantize_layer_wise(src, out, PLAN, algo, calib=calib, progress=False, log=lambda s: None)
    written.clear()
    monkeypatch.setattr(lw, "_write_block", lambda sk, i, o, *rest: written.append(i) or real(sk, i, o, *rest))
    return written


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_state_records_size_and_sha256_of_every_file(tied, tmp_path):
    import hashlib

    out = tmp_path / "out"
    state = quantize_layer_wise(tied, out, PLAN, WeightAlgo("rtn"), progress=False, log=lambda s: None)
    assert state == json.loads((out / STATE_FILE).read_text())
    names = [state["shards"][str(i)] for i in range(3)] + [state["rest_shard"], lw.INDEX_FILE]
    assert sorted(state["files"]) == sorted(names)
    for name in names:
        data = (out / name).read_bytes()
        assert state["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert lw.check_complete(out) is None


@pytest.mark.parametrize("algo", [_algo("rtn"), _algo("gptq")], ids=["rtn", "gptq"])
@pytest.mark.parametrize("damage", [_truncate, _flip_last_byte], ids=["truncated", "flipped"])
def test_resume_redoes_a_damaged_finished_shard(tied, tmp_path, ids, monkeypatch, algo, damage):
    """A finished shard that is not what the state recorded (cut short; or the same size with other
    bytes) is never trusted: its block is redone, the file named in the log, the bytes those of an
    uninterrupted run."""
    calib = ids if algo.needs_calib else None
    quantize_layer_wise(tied, tmp_path / "whole", PLAN, algo, calib=calib, progress=False, log=lambda s: None)
    out = tmp_path / "resumed"
    written = _interrupted(tied, out, algo, calib, monkeypatch, kill_after=2)
    shard = out / json.loads((out / STATE_FILE).read_text())["shards"]["0"]
    damage(shard)
    said = []
    quantize_layer_wise(tied, out, PLAN, algo, calib=calib, progress=False, log=said.append)
    assert written == [0, 2]  # block 0 redone, block 1 trusted, block 2 new
    assert any(str(shard) in s and "block 0 is redone" in s for s in said), said
    assert _files(out) == _files(tmp_path / "whole")


def test_state_without_checksums_is_not_trusted(tied, tmp_path, monkeypatch):
    """Finished shards recorded without size and checksum (an older state file) are redone."""
    out = tmp_path / "out"
    quantize_layer_wise(tied, tmp_path / "whole", PLAN, WeightAlgo("rtn"), progress=False, log=lambda s: None)
    written = _interrupted(tied, out, WeightAlgo("rtn"), None, monkeypatch, kill_after=2)
    state = json.loads((out / STATE_FILE).read_text())
    del state["files"]
    (out / STATE_FILE).write_text(json.dumps(state))
    said = []
    quantize_layer_wise(tied, out, PLAN, WeightAlgo("rtn"), progress=False, log=said.append)
    assert written == [0, 1, 2]
    assert sum("no size and checksum recorded" in s for s in said) == 2, said
    assert _files(out) == _files(tmp_path / "whole")


@pytest.mark.parametrize("what", ["block", "rest", "index", "missing"])
def test_complete_checkpoint_is_verified_on_rerun(tied, tmp_path, ids, monkeypatch, what):
    """Rerunning a complete checkpoint verifies every shard and the index: a damaged block is redone
    (only it), a damaged rest shard or index is rewritten, without running the blocks again."""
    algo = _algo("gptq")
    out = tmp_path / "out"
    state = quantize_layer_wise(tied, out, PLAN, algo, calib=ids, progress=False, log=lambda s: None)
    good = _files(out)
    target = {"block": out / state["shards"]["1"], "rest": out / state["rest_shard"],
              "index": out / lw.INDEX_FILE, "missing": out / state["shards"]["2"]}[what]
    if what == "index":
        target.write_text(target.read_text().replace('"weight_map"', '"weight_mop"'))
    elif what == "missing":
        target.unlink()
    else:
        _truncate(target)
    problem = lw.check_complete(out)
    assert problem is not None and "damaged" in problem
    real_write, written = lw._write_block, []
    monkeypatch.setattr(lw, "_write_block", lambda sk, i, o, *rest: written.append(i) or real_write(sk, i, o, *rest))
    real_capture, captured = lw.capture_block_inputs, []
    monkeypatch.setattr(lw, "capture_block_inputs", lambda *a, **k: captured.append(1) or real_capture(*a, **k))
    said = []
    state = quantize_layer_wise(tied, out, PLAN, algo, calib=ids, progress=False, log=said.append)
    assert state["complete"] and not any("already complete" in s for s in said)
    assert any(str(target) in s and "not trusted" in s for s in said), said
    assert written == {"block": [1], "missing": [2]}.get(what, [])
    assert captured == ([1] if what in ("block", "missing") else [])  # the final files need no forward
    assert _files(out) == good
    assert lw.check_complete(out) is None
    said.clear()
    quantize_layer_wise(tied, out, PLAN, algo, calib=ids, progress=False, log=said.append)
    assert said == [f"[wkvaq] {out}: layer-wise checkpoint already complete (every shard verified)"]


def test_stale_temporary_files_are_removed(tied, tmp_path, monkeypatch):
    """Temporary files a killed writer left (a shard's, the state's, the index's) and the activations
    directory are removed when a run starts, also from a complete checkpoint; other files stay."""
    out = tmp_path / "out"
    quantize_layer_wise(tied, tmp_path / "whole", PLAN, WeightAlgo("rtn"), progress=False, log=lambda s: None)
    _interrupted(tied, out, WeightAlgo("rtn"), None, monkeypatch, kill_after=1)
    stale = [".model-00002-of-00004.safetensors.4242.tmp", f".{STATE_FILE}.k3j_x9q.tmp", f".{lw.INDEX_FILE}.abc.tmp"]
    for name in stale:
        (out / name).write_bytes(b"half written")
    (out / lw.ACTIVATIONS_DIR / "gen0").mkdir(parents=True)
    said = []
    quantize_layer_wise(tied, out, PLAN, WeightAlgo("rtn"), progress=False, log=said.append)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name == lw.ACTIVATIONS_DIR]
    assert any("removed 3 stale temporary file(s)" in s for s in said), said
    assert _files(out) == _files(tmp_path / "whole")
    (out / stale[0]).write_bytes(b"x")
    (out / ".notes.tmp").write_text("not the writer's")
    said.clear()
    state = quantize_layer_wise(tied, out, PLAN, WeightAlgo("rtn"), progress=False, log=said.append)
    assert state["complete"] and "already complete" in said[-1]
    assert not (out / stale[0]).exists() and (out / ".notes.tmp").is_file()
    # a directory holding nothing but a dead run's lock file and temporary files is a new run's
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / lw.LOCK_FILE).write_text("")
    (fresh / f".{STATE_FILE}.zz.tmp").write_text("{")
    quantize_layer_wise(tied, fresh, PLAN, WeightAlgo("rtn"), progress=False, log=lambda s: None)
    assert _files(fresh) == _files(tmp_path / "whole")


_HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_into_the_same_directory_is_refused(tied, tmp_path, capsys):
    """While another process holds the directory's lock, a run is refused at once (main.py: one
    `error:` line, exit 2) and writes nothing; once that process dies (killed), the run proceeds."""
    import subprocess
    import sys

    import main as main_module

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out / lw.LOCK_FILE)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"--save_quant {out}: another layer-wise run holds it "
                                             f"\\(pid {holder.pid}\\)"):
            quantize_layer_wise(tied, out, PLAN, WeightAlgo("rtn"), progress=False, log=lambda s: None)
        assert sorted(p.name for p in out.iterdir()) == [lw.LOCK_FILE]
        code = main_module.main(["--model", str(tied), "--w_bits", "4", "--w_group_size", "16", "--layer_wise",
                                 "--save_quant", str(out), "--no_progress"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: --save_quant {out}: another layer-wise run holds it")
        assert err.count("\n") == 1, err
    finally:
        holder.kill()
        holder.wait()
    state = quantize_layer_wise(tied, out, PLAN, WeightAlgo("rtn"), progress=False, log=lambda s: None)
    assert state["complete"]
    assert (out / lw.LOCK_FILE).read_text().strip() == str(os.getpid())


def test_lock_is_released_when_a_run_fails_and_is_not_part_of_the_checkpoint(tied, tmp_path, monkeypatch):
    """A run that dies with an exception releases the lock (the resume in the same process is not
    refused); the lock file is never copied into a checkpoint written from this one."""
    out = tmp_path / "out"
    _interrupted(tied, out, WeightAlgo("rtn"), None, monkeypatch, kill_after=1)
    assert (out / lw.LOCK_FILE).is_file()
    quantize_layer_wise(tied, out, PLAN, WeightAlgo("rtn"), progress=False, log=lambda s: None)
    again = tmp_path / "again"
    quantize_layer_wise(out, again, PLAN, WeightAlgo("rtn"), progress=False, log=lambda s: None)
    assert STATE_FILE in {p.name for p in again.iterdir()}
    assert json.loads((again / STATE_FILE).read_text())["complete"]
    assert not set(_files(again)) - set(_files(out))  # nothing but what a checkpoint holds
