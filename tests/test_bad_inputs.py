"""The bad-input catalogue: one case per line, for main.py, `python -m awq.entry`, the report and
the files they read. Each case must exit with its code and a one-line message holding its words,
with no traceback, and (unless marked `after_load`) before any model weight is read: loading
weights fails the case.

A case is (id, entry, argv with {placeholders}, exit code, words). Placeholders name files built
by `_files` in a per-test directory: {tiny} a valid tiny Llama checkpoint, {out} a results
directory, and the bad files below.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import main as main_module
from awq import entry as awq_entry
from wkvaq_quant.report import __main__ as report_main

M = "main"
A = "awq"
R = "report"
BASE = ["--model", "{tiny}", "--results_dir", "{out}", "--no_progress", "--n_windows", "1", "--seq_len", "64"]

CASES = [
    # -- model and checkpoint files -------------------------------------------------------------------------
    ("config-not-json", M, ["--model", "{bad_config}", "--k_bits", "4"], 2, ["config.json", "cannot read"]),
    ("config-not-object", M, ["--model", "{list_config}"], 2, ["not a JSON object"]),
    ("phi3-refused", M, ["--model", "{phi3}", "--k_bits", "4"], 2, ["model_type 'phi3' is not supported", "llama",
                                                                     "qwen3", "gemma3_text"]),
    ("gemma3-multimodal-refused", M, ["--model", "{gemma3_mm}", "--k_bits", "4"], 2,
     ["model_type 'gemma3' is not supported", "gemma3_text"]),
    ("no-weights", M, ["--model", "{no_weights}"], 2, ["has no weights"]),
    ("malicious-bin-model", M, ["--model", "{evil_model}"], 2, ["--model", "pytorch_model.bin", "cannot be read"]),
    ("truncated-shard-model", M, ["--model", "{cut_model}"], 2, ["--model", "model.safetensors"]),
    ("model-missing-dir", M, ["--model", "./nowhere/at/all"], 2, ["--model", "not a registered short name"]),
    ("awq-lp-random-bytes", M, [*BASE, "--awq_model_path_lp", "{random_st}"], 2, ["--awq_model_path_lp", "random"]),
    ("awq-lp-truncated", M, [*BASE, "--awq_model_path_lp", "{cut_st}"], 2, ["--awq_model_path_lp", "cut"]),
    ("awq-lp-pickle-bin", M, [*BASE, "--awq_model_path_lp", "{evil_bin}"], 2, ["--awq_model_path_lp", "evil.bin"]),
    ("awq-lp-pickle-pt", M, [*BASE, "--awq_model_path_lp", "{evil_pt}"], 2, ["--awq_model_path_lp", "evil.pt"]),
    ("awq-lp-list-pt", M, [*BASE, "--awq_model_path_lp", "{list_pt}"], 2, ["holds a list"]),
    ("awq-lp-missing", M, [*BASE, "--awq_model_path_lp", "{out}/none.pt"], 2, ["--awq_model_path_lp", "no checkpoint"]),
    # -- flags -------------------------------------------------------------------------------------------
    ("w-group-0", M, [*BASE, "--w_bits", "4", "--w_group_size", "0"], 2, ["--w_group_size 0"]),
    ("w-group-neg", M, [*BASE, "--w_bits", "4", "--w_group_size", "-2"], 2, ["--w_group_size -2"]),
    ("v-group-0", M, [*BASE, "--v_bits", "4", "--v_group_size", "0"], 2, ["--v_group_size 0"]),
    ("w-group-over-row", M, [*BASE, "--w_bits", "4", "--w_group_size", "1000"], 2,
     ["--w_group_size 1000", "larger than the 64 input channels"]),
    ("k-group-over-row", M, [*BASE, "--k_bits", "4", "--k_group_size", "1000"], 2, ["--k_group_size 1000", "K width"]),
    ("kcvt-group-over-window", M, [*BASE, "--k_bits", "4", "--kv_quant_method", "KCVT", "--k_group_size", "128"], 2,
     ["--k_group_size 128", "tokens of a window"]),
    ("q-group-over-head", M, [*BASE, "--q_bits", "8", "--q_group_size", "32"], 2, ["--q_group_size 32", "head_dim"]),
    ("residual-over-window", M, [*BASE, "--k_bits", "4", "--v_bits", "4", "--kv_residual_len", "100000"], 2,
     ["--kv_residual_len 100000", "quantize nothing"]),
    ("w-bits-17", M, [*BASE, "--w_bits", "17"], 2, ["--w_bits 17", "1..16"]),
    ("w-bits-0", M, [*BASE, "--w_bits", "0"], 2, ["--w_bits 0"]),
    ("k-bits-fp", M, [*BASE, "--k_bits", "8", "--kv_zero_point", "nope"], 2, ["--kv_zero_point", "invalid choice"]),
    ("abbrev-w-bit", M, [*BASE, "--w_bit", "4"], 2, ["unrecognized arguments: --w_bit"]),
    ("abbrev-w-dtype", M, [*BASE, "--w_dt", "int"], 2, ["unrecognized arguments"]),
    ("flash-attn-missing", M, [*BASE, "--attn_implementation", "flash_attention_2"], 2, ["flash_attention_2"]),
    ("cuda-missing", M, [*BASE, "--device", "cuda"], 2, ["--device cuda"]),
    ("seq-len-0", M, [*BASE[:-2], "--seq_len", "0"], 2, ["--seq_len"]),
    ("unknown-dataset", M, [*BASE, "--datasets", "imagenet"], 2, ["imagenet"]),
    ("kcvt-kscale", M, [*BASE, "--kv_quant_method", "KCVT", "--k_bits", "4", "--k_group_size", "16",
                        "--apply_k_scale"], 2, ["--apply_k_scale cannot be combined"]),
    ("gptq-no-weights", M, [*BASE, "--weight_algo", "gptq"], 2, ["needs quantized weights"]),
    ("awq-bf16-with-acts", M, [*BASE, "--w_bits", "4", "--a_bits", "8", "--weight_algo", "awq", "--search_dtype",
                               "bfloat16"], 2, ["--search_dtype bfloat16"]),
    ("use-fp16-dtype-clash", M, [*BASE, "--use_fp16", "--dtype", "float32"], 2, ["--use_fp16", "--dtype float32"]),
    ("layer-wise-kv", M, [*BASE, "--k_bits", "4", "--layer_wise", "--save_quant", "{out}/lw"], 2,
     ["--layer_wise writes quantized weights only"]),
    # -- block-streamed evaluation and device maps -------------------------------------------------------
    ("stream-hub-id", M, [*BASE[2:], "--model", "someone/some-model", "--stream_blocks"], 2,
     ["--stream_blocks", "download the hub model first"]),
    ("stream-bin-only", M, [*BASE[2:], "--model", "{bin_model}", "--stream_blocks"], 2,
     ["--stream_blocks reads safetensors shards", "pytorch_model.bin"]),
    ("stream-missing-shard", M, [*BASE[2:], "--model", "{missing_shard}", "--stream_blocks"], 2,
     ["--stream_blocks", "missing", "model-00002-of-00002.safetensors"]),
    ("stream-device-map", M, [*BASE, "--stream_blocks", "--device_map", "auto"], 2,
     ["--stream_blocks", "does not combine with --device_map"]),
    ("stream-tasks", M, [*BASE, "--stream_blocks", "--tasks", "arc_easy"], 2, ["--stream_blocks", "--tasks"]),
    ("stream-gptq", M, [*BASE, "--stream_blocks", "--w_bits", "4", "--weight_algo", "gptq"], 2,
     ["--stream_blocks", "--layer_wise --save_quant DIR"]),
    ("stream-layer-wise", M, [*BASE, "--stream_blocks", "--w_bits", "4", "--layer_wise", "--save_quant", "{out}/lw2"],
     2, ["--stream_blocks", "--layer_wise"]),
    ("offload-without-stream", M, [*BASE, "--w_bits", "4", "--offload_activations"], 2,
     ["--offload_activations", "--stream_blocks"]),
    ("device-map-no-cuda", M, [*BASE, "--device_map", "auto"], 2, ["--device_map", "--device cuda"]),
    ("device-map-cuda-missing", M, [*BASE, "--device", "cuda", "--device_map", "auto"], 2, ["--device cuda"]),
    ("device-map-unknown", M, [*BASE, "--device_map", "everywhere"], 2, ["--device_map 'everywhere'", "balanced"]),
    ("device-map-bad-json", M, [*BASE, "--device_map", "{{\"model\": "], 2, ["--device_map", "not valid JSON"]),
    ("device-map-bad-device", M, [*BASE, "--device_map", "{{\"model\": \"tpu\"}}"], 2, ["--device_map", "'tpu'"]),
    ("device-map-file-missing", M, [*BASE, "--device_map", "{out}/none.json"], 2, ["--device_map", "none.json"]),
    ("max-memory-alone", M, [*BASE, "--max_memory", "0=10GiB"], 2, ["--max_memory", "with --device_map"]),
    ("max-memory-bad", M, [*BASE, "--device_map", "auto", "--max_memory", "0=lots"], 2, ["--max_memory", "0=lots"]),
    ("save-quant-without-layer-wise", M, [*BASE, "--w_bits", "4", "--save_quant", "{out}/q"], 2, ["--save_quant"]),
    # -- results store -----------------------------------------------------------------------------------
    ("results-dir-is-file", M, ["--model", "{tiny}", "--results_dir", "{a_file}", "--n_windows", "1", "--seq_len",
                                "64"], 2, ["--results_dir", "is a file"]),
    ("results-dir-unwritable", M, ["--model", "{tiny}", "--results_dir", "/proc/wkvaq-results", "--n_windows", "1",
                                   "--seq_len", "64"], 2, ["--results_dir", "cannot write"]),  # even for root
    ("corrupt-result-same-setting", M, [*BASE, "--w_bits", "4"], 2, ["result file", ".json", "--overwrite"]),
    ("corrupt-result-print-path", M, [*BASE, "--w_bits", "4", "--print_result_path"], 2, ["result file", "--overwrite"]),
    # -- YAML configs ------------------------------------------------------------------------------------
    ("yaml-missing", M, [*BASE, "--config", "{out}/none.yml"], 2, ["--config", "no such file"]),
    ("yaml-alias-bomb", M, [*BASE, "--config", "{bomb}"], 2, ["--config", "aliases"]),
    ("yaml-small-alias-bomb", M, [*BASE, "--config", "{small_bomb}"], 2, ["--config", "aliases"]),
    ("yaml-deep-nesting", M, [*BASE, "--config", "{deep}"], 2, ["--config", "nested deeper"]),
    ("yaml-list-key", M, [*BASE, "--config", "{list_key}"], 2, ["--config", "mapping key must be a plain value"]),
    ("yaml-too-big", M, [*BASE, "--config", "{big_yaml}"], 2, ["--config", "bytes"]),
    ("yaml-python-tag", M, [*BASE, "--config", "{py_tag}"], 2, ["--config", "not valid YAML"]),
    ("yaml-not-utf8", M, [*BASE, "--config", "{latin1}"], 2, ["--config"]),
    ("yaml-unknown-layer", M, [*BASE, "--config", "{bad_layer}"], 2, ["unknown layer name"]),
    ("yaml-block-past-depth", M, [*BASE, "--config", "{past_depth}"], 2, ["names block(s) 5", "has 2 blocks"]),
    # -- awq.entry ---------------------------------------------------------------------------------------
    ("awq-q-group-0", A, ["--model", "{tiny}", "--q_group_size", "0", "--dump_fake", "{out}/f"], 2,
     ["--q_group_size 0"]),
    ("awq-w-bit-16", A, ["--model", "{tiny}", "--w_bit", "16", "--dump_fake", "{out}/f"], 2, ["--w_bit 16"]),
    ("awq-cache-meta-list", A, ["--model", "{tiny}", "--q_group_size", "32", "--load_awq", "{bad_cache}",
                                "--dump_fake", "{out}/f"], 2,
     ["--load_awq", "meta is a list"]),
    ("awq-cache-random", A, ["--model", "{tiny}", "--q_group_size", "32", "--load_awq", "{random_st}",
                             "--dump_fake", "{out}/f"], 2,
     ["--load_awq", "not a readable AWQ cache"]),
    ("awq-q-group-over-row", A, ["--model", "{tiny}", "--dump_fake", "{out}/f"], 2,
     ["--q_group_size 128", "larger than the 64 input channels"]),
    ("awq-config-gptq", A, ["--model", "{tiny}", "--config", "{gptq_yaml}", "--run_awq", "--dump_awq", "{out}/c.pt"],
     2, ["cannot run in awq.entry"]),
    ("awq-abbrev", A, ["--model", "{tiny}", "--w_bits", "4", "--dump_fake", "{out}/f"], 2, ["unrecognized"]),
    ("awq-phi3", A, ["--model", "{phi3}", "--dump_fake", "{out}/f"], 2, ["model_type 'phi3' is not supported"]),
    # -- report ------------------------------------------------------------------------------------------
    ("report-missing-dir", R, ["{out}/nothing"], 2, ["does not exist"]),
    ("report-wrong-types", R, ["{typed_results}"], 2, ["no result files", "skipping"]),
    ("report-plot-missing-dir", R, ["{typed_results}", "--plot", "{out}/no/such/dir/p.png"], 2,
     ["--plot", "does not exist"]),
]


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


class _Evil:
    def __reduce__(self):  # would run a shell command if unpickled without weights_only
        return (shutil.rmtree, ("/definitely/not/here",))


def _files(tmp: Path, tiny: Path) -> dict[str, str]:
    """The files the cases name, built once per test directory."""
    f: dict[str, Path] = {"tiny": tiny, "out": tmp / "results"}
    f["out"].mkdir(parents=True, exist_ok=True)

    def model_dir(name: str, config) -> Path:
        d = tmp / name
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        return d

    f["bad_config"] = model_dir("bad_config", "{not json")
    f["list_config"] = model_dir("list_config", "[1, 2]")
    f["phi3"] = model_dir("phi3", {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]})
    f["gemma3_mm"] = model_dir("gemma3_mm", {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]})
    cfg = json.loads((tiny / "config.json").read_text())
    f["no_weights"] = model_dir("no_weights", cfg)
    f["evil_model"] = model_dir("evil_model", cfg)
    torch.save({"x": _Evil()}, f["evil_model"] / "pytorch_model.bin")
    f["cut_model"] = model_dir("cut_model", cfg)
    data = (tiny / "model.safetensors").read_bytes()
    (f["cut_model"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    f["bin_model"] = model_dir("bin_model", cfg)
    from safetensors.torch import load_file

    torch.save(load_file(tiny / "model.safetensors"), f["bin_model"] / "pytorch_model.bin")
    f["missing_shard"] = model_dir("missing_shard", cfg)
    shutil.copy(tiny / "model.safetensors", f["missing_shard"] / "model-00001-of-00002.safetensors")
    names = load_file(tiny / "model.safetensors")
    (f["missing_shard"] / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: "model-00001-of-00002.safetensors" if i else "model-00002-of-00002.safetensors"
        for i, k in enumerate(names)}}))
    f["random_st"] = tmp / "random.safetensors"
    f["random_st"].write_bytes(bytes(range(256)) * 40)
    f["cut_st"] = tmp / "cut.safetensors"
    full = _safetensors_bytes({"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 128)})
    f["cut_st"].write_bytes(full[:-100])
    f["evil_bin"], f["evil_pt"], f["list_pt"] = tmp / "evil.bin", tmp / "evil.pt", tmp / "list.pt"
    torch.save({"w": _Evil()}, f["evil_bin"])
    f["evil_pt"].write_bytes(pickle.dumps(_Evil()))
    torch.save([torch.zeros(2)], f["list_pt"])
    f["a_file"] = tmp / "a_file"
    f["a_file"].write_text("x")
    # a corrupt result file under the name of the --w_bits 4 setting
    from wkvaq_quant.cli import parse_config
    from wkvaq_quant.run import result_status

    path, _ = result_status(parse_config([a.format(tiny=tiny, out=f["out"]) for a in BASE] + ["--w_bits", "4"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"model": {"name": "unterminated')
    yml = tmp / "yml"
    yml.mkdir(exist_ok=True)

    def yaml_file(name: str, text: str | bytes) -> Path:
        p = yml / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p

    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i, c in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{c}: &{c} [{','.join(['*' + prev] * 9)}]")
    f["bomb"] = yaml_file("bomb.yml", "\n".join(lines) + "\nquant: *i\n")
    f["small_bomb"] = yaml_file("small.yml", "a: &a [x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                                "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nquant: {method: RTN, x: *c}\n")
    f["deep"] = yaml_file("deep.yml", "quant: " + "[" * 20000 + "]" * 20000 + "\n")  # 40 KB, under the size limit
    f["list_key"] = yaml_file("list_key.yml", "quant:\n  ? [a, b]\n  : 1\n")
    f["big_yaml"] = yaml_file("big.yml", "# " + "x" * 70000 + "\nquant: {method: RTN}\n")
    f["py_tag"] = yaml_file("tag.yml", "quant: !!python/object/apply:os.system ['echo owned']\n")
    f["latin1"] = yaml_file("latin1.yml", "quant:\n  method: RTN # caf\xe9\n".encode("latin-1"))
    f["bad_layer"] = yaml_file("layer.yml", "quant:\n  weight: {bit: 4}\n  mix_bits:\n    s:\n"
                               "      layer_name: [mlp.down_proj]\n      weight: {bit: 8}\n")
    f["past_depth"] = yaml_file("depth.yml", "quant:\n  weight: {bit: 4}\n  mix_bits:\n    s:\n"
                                "      layer_name: [down_proj#5]\n      weight: {bit: 8}\n")
    f["gptq_yaml"] = yaml_file("gptq.yml", "quant:\n  method: Gptq\n  weight: {bit: 4}\n")
    f["bad_cache"] = tmp / "cache.pt"
    torch.save({"scale": {}, "clip": {}, "meta": [1, 2]}, f["bad_cache"])
    typed = tmp / "typed"
    typed.mkdir(exist_ok=True)
    (typed / "r.json").write_text(json.dumps({"model": {"name": 3}, "config": {"dtype": 1}, "slug": [],
                                              "results": {"x": {"ppl": "high"}}}))
    f["typed_results"] = typed
    return {k: str(v) for k, v in f.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("bad-inputs")
    return _files(tmp, tiny_llama)


@pytest.fixture
def weights_forbidden(monkeypatch):
    """Any read of model weights fails the case: refusals come before that."""
    import transformers

    from wkvaq_quant import run as run_module

    reads = []

    def forbidden(*args, **kwargs):
        reads.append(args)
        raise AssertionError("model weights were read for bad input")

    monkeypatch.setattr(run_module, "load_model", forbidden)
    monkeypatch.setattr(awq_entry, "load_model", forbidden)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    from wkvaq_quant.weights import layerwise

    monkeypatch.setattr(layerwise, "read_tensor", forbidden)  # layer-wise and block-streamed reads
    monkeypatch.setattr(layerwise, "read_rows", forbidden)
    return reads


ENTRIES = {M: main_module.main, A: awq_entry.main, R: report_main.main}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, files, weights_forbidden, capsys, isolated_cache, monkeypatch):
    name, entry, argv, code, words = case
    monkeypatch.delenv("WKVAQ_DEBUG", raising=False)
    argv = [a.format(**files) for a in argv]
    try:
        got = ENTRIES[entry](argv)
    except SystemExit as err:  # argparse's refusals
        got = err.code
    err = capsys.readouterr().err
    assert not weights_forbidden, f"{name}: weights were read before the refusal"
    assert got == code, f"{name}: exit {got}, expected {code}; stderr: {err[-500:]}"
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.startswith(("error:", f"{Path(argv[0]).name}: error"))
            or "error:" in line]
    assert last, f"{name}: no error line in {err[-300:]!r}"
    assert len(last[-1]) < 1500, f"{name}: the message is {len(last[-1])} characters long"
    for w in words:
        assert w in err, f"{name}: {w!r} not in {err[-600:]!r}"


def test_catalogue_covers_every_entry_and_is_large():
    assert {c[1] for c in CASES} == {M, A, R} and len(CASES) >= 55
    assert len({c[0] for c in CASES}) == len(CASES)


def test_a_yaml_bomb_is_refused_fast(files):
    import time

    from wkvaq_quant.mix_bits import load_quant_config

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="aliases"):
        load_quant_config(files["bomb"])
    assert time.perf_counter() - t0 < 0.5


def test_failed_result_write_keeps_the_result(tmp_path, monkeypatch):
    """A write that fails after the evaluation saves the record elsewhere and says where."""
    from wkvaq_quant import results

    real = results.atomic_write_json

    def failing(path, payload):
        if Path(path).parent.name == "m":
            raise OSError(28, "No space left on device")
        real(path, payload)

    monkeypatch.setattr(results, "atomic_write_json", failing)
    monkeypatch.setattr(results.tempfile, "gettempdir", lambda: str(tmp_path))
    with pytest.raises(ValueError, match="No space left on device.*saved to") as err:
        results.write_result(tmp_path / "r" / "m" / "x.json", {"results": {"wiki": {"ppl": 1.5}}})
    rescued = Path(str(err.value).rsplit("saved to ", 1)[1])
    assert json.loads(rescued.read_text())["results"]["wiki"]["ppl"] == 1.5


def test_result_files_get_the_users_umask_and_stale_tmp_files_go(tmp_path):
    import os
    import time

    from wkvaq_quant.results import atomic_write_json, clean_stale_tmp

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    stale = tmp_path / ".a.json.abc.tmp"
    stale.write_text("half")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    fresh = tmp_path / ".a.json.def.tmp"
    fresh.write_text("being written")
    assert clean_stale_tmp(tmp_path / "a.json") == [stale] and fresh.exists()


def test_debug_shows_the_traceback(files, monkeypatch):
    monkeypatch.setenv("WKVAQ_DEBUG", "1")
    with pytest.raises(ValueError, match="model_type 'phi3'"):
        main_module.main(["--model", files["phi3"], "--k_bits", "4"])
