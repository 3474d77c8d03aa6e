"""The report over hand-written result files: exact tables, valid PNGs with the expected series."""

import json
import struct
from dataclasses import dataclass

import pytest

from wkvaq_quant.config import QuantArgs

from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.layer_bits import LINEAR_LAYERS, layer_bits_table
from wkvaq_quant.report import build_table, format_csv, format_markdown, load_records, plot_kv_bits, \
    plot_layer_heatmap
from wkvaq_quant.report.__main__ import main as report_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(model, slug, n_windows=8, ppl=None, tasks=None, k_bits=16, v_bits=16, layer_bits=None):
    rec = {
        "model": {"name": model},
        "config": {"dtype": "float32", "seq_len": 2048, "n_windows": n_windows,
                   "plan": {"k": {"bits": k_bits}, "v": {"bits": v_bits}}},
        "slug": slug,
        "results": {name: {"ppl": v} for name, v in (ppl or {}).items()},
    }
    if tasks:
        rec["tasks"] = {name: {"primary": "acc", "metrics": {"acc": v, "acc_norm": v / 2}}
                        for name, v in tasks.items()}
    if layer_bits:
        rec["layer_bits"] = layer_bits
    return rec


def store(tmp_path):
    recs = [
        record("tiny-a", "fp-float32-seq2048-nw8-00000001", ppl={"wiki_sample": 20.0, "c4": 30.0}),
        record("tiny-a", "k4v4-KTVT-float32-seq2048-nw8-00000002", ppl={"wiki_sample": 21.5, "c4": 33.25},
               k_bits=4, v_bits=4),
        record("tiny-a", "k2v2-KTVT-float32-seq2048-nw8-00000003", ppl={"wiki_sample": 40.0}, k_bits=2, v_bits=2),
        record("tiny-a", "k4v4-KTVT-kscale-float32-seq2048-nw8-00000004", ppl={"wiki_sample": 20.5},
               k_bits=4, v_bits=4),
        record("tiny-a", "k2v2-KTVT-kscale-float32-seq2048-nw8-00000005", ppl={"wiki_sample": 25.0},
               k_bits=2, v_bits=2),
        record("tiny-a", "w4g128-a8fp8-k4v4-KTVT-float32-seq2048-nw4-00000006", n_windows=4,
               ppl={"wiki_sample": 22.0}, k_bits=4, v_bits=4),
        record("tiny-b", "fp-float32-seq2048-nw8-00000007", ppl={"wiki_sample": 10.0}, tasks={"mc": 0.625}),
        record("tiny-b", "w4g128-float32-seq2048-nw8-00000008", ppl={"wiki_sample": 11.0}, tasks={"mc": 0.5}),
    ]
    for i, rec in enumerate(recs):
        path = tmp_path / rec["model"]["name"] / f"{rec['slug']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
    (tmp_path / "tiny-a" / ".half-written.json.tmp").write_text("{")  # an atomic write in progress
    (tmp_path / "notes.json").write_text('{"unrelated": true}')
    return tmp_path


EXPECTED_MD = """\
| model | setting | eval | c4 | Δ c4 | wiki_sample | Δ wiki_sample | mc (acc) | Δ mc (acc) |
|---|---|---|---:|---:|---:|---:|---:|---:|
| tiny-a | w4g128-a8fp8-k4v4-KTVT | float32 seq2048 nw4 |  |  | 22.0000 |  |  |  |
| tiny-a | fp | float32 seq2048 nw8 | 30.0000 |  | 20.0000 |  |  |  |
| tiny-a | k2v2-KTVT | float32 seq2048 nw8 |  |  | 40.0000 | +20.0000 |  |  |
| tiny-a | k2v2-KTVT-kscale | float32 seq2048 nw8 |  |  | 25.0000 | +5.0000 |  |  |
| tiny-a | k4v4-KTVT | float32 seq2048 nw8 | 33.2500 | +3.2500 | 21.5000 | +1.5000 |  |  |
| tiny-a | k4v4-KTVT-kscale | float32 seq2048 nw8 |  |  | 20.5000 | +0.5000 |  |  |
| tiny-b | fp | float32 seq2048 nw8 |  |  | 10.0000 |  | 0.6250 |  |
| tiny-b | w4g128 | float32 seq2048 nw8 |  |  | 11.0000 | +1.0000 | 0.5000 | -0.1250 |"""

EXPECTED_CSV = """\
model,setting,eval,c4,delta c4,wiki_sample,delta wiki_sample,mc (acc),delta mc (acc)
tiny-a,w4g128-a8fp8-k4v4-KTVT,float32 seq2048 nw4,,,22.0,,,
tiny-a,fp,float32 seq2048 nw8,30.0,,20.0,,,
tiny-a,k2v2-KTVT,float32 seq2048 nw8,,,40.0,20.0,,
tiny-a,k2v2-KTVT-kscale,float32 seq2048 nw8,,,25.0,5.0,,
tiny-a,k4v4-KTVT,float32 seq2048 nw8,33.25,3.25,21.5,1.5,,
tiny-a,k4v4-KTVT-kscale,float32 seq2048 nw8,,,20.5,0.5,,
tiny-b,fp,float32 seq2048 nw8,,,10.0,,0.625,
tiny-b,w4g128,float32 seq2048 nw8,,,11.0,1.0,0.5,-0.125
"""


def test_markdown_table_equals_hand_written(tmp_path):
    warnings = []
    records = load_records(store(tmp_path), warn=warnings.append)
    assert len(records) == 8 and len(warnings) == 1 and "notes.json" in warnings[0]
    assert format_markdown(build_table(records)) == EXPECTED_MD


def test_csv_table_equals_hand_written(tmp_path):
    assert format_csv(build_table(load_records(store(tmp_path), warn=lambda m: None))) == EXPECTED_CSV


def test_cli_prints_table_and_filters_model(tmp_path, capsys):
    root = store(tmp_path)
    assert report_main([str(root)]) == 0
    assert capsys.readouterr().out.strip() == EXPECTED_MD
    assert report_main([str(root), "--format", "csv", "--model", "tiny-b"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["model,setting,eval,wiki_sample,delta wiki_sample,mc (acc),delta mc (acc)",
                   "tiny-b,fp,float32 seq2048 nw8,10.0,,0.625,",
                   "tiny-b,w4g128,float32 seq2048 nw8,11.0,1.0,0.5,-0.125"]
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_kv_plot_is_png_with_one_series_per_kv_mode(tmp_path):
    records = load_records(store(tmp_path / "r"), warn=lambda m: None)
    out = tmp_path / "kv.png"
    labels = plot_kv_bits(records, out, "wiki_sample")
    assert labels == ["tiny-a float32 seq2048 nw4: w4g128-a8fp8-kv*-KTVT",
                      "tiny-a float32 seq2048 nw8: kv*-KTVT",
                      "tiny-a float32 seq2048 nw8: kv*-KTVT-kscale"]
    assert png_size(out) == (800, 500)
    with pytest.raises(ValueError, match="--plot_dataset 'wikitext2'.*available: c4, wiki_sample"):
        plot_kv_bits(records, out, "wikitext2")


def test_kv_plot_series_points(tmp_path):
    from wkvaq_quant.report.plots import kv_series

    series = kv_series(load_records(store(tmp_path), warn=lambda m: None), "wiki_sample")
    assert series["tiny-a float32 seq2048 nw8: kv*-KTVT-kscale"] == [(2.0, 25.0), (4.0, 20.5)]
    assert series["tiny-a float32 seq2048 nw8: kv*-KTVT"] == [(2.0, 40.0), (4.0, 21.5)]
    unpaired = [record("m", f"k{k}v{v}-KTVT-float32-seq2048-nw8-0000000{i}", ppl={"wiki_sample": p}, k_bits=k, v_bits=v)
                for i, (k, v, p) in enumerate([(4, 4, 21.0), (2, 4, 30.0), (4, 2, 35.0), (2, 2, 50.0)])]
    assert kv_series(unpaired, "wiki_sample") == {"m float32 seq2048 nw8: kv*-KTVT, V2": [(2.0, 50.0), (4.0, 35.0)],
                                                  "m float32 seq2048 nw8: kv*-KTVT, V4": [(2.0, 30.0), (4.0, 21.0)]}


def test_heatmap_of_layer_tables(tmp_path):
    mixed = {"layers": list(LINEAR_LAYERS),
             "w_bits": [[4, 4, 4, 16, 4, 4, 8], [4, 4, 4, 16, 4, 4, 4], [4, 4, 4, 16, 4, 4, 8]],
             "a_bits": [[8] * 7, [8] * 7, [16] * 7],
             "w_dtype": [["int"] * 7] * 3}
    root = tmp_path / "r"
    recs = [record("tiny-a", "w4-mix-float32-seq2048-nw8-0000000a", layer_bits=mixed),
            record("tiny-a", "fp-float32-seq2048-nw8-0000000b")]
    for rec in recs:
        (root / "tiny-a").mkdir(parents=True, exist_ok=True)
        (root / "tiny-a" / f"{rec['slug']}.json").write_text(json.dumps(rec))
    out = tmp_path / "heat.png"
    assert plot_layer_heatmap(load_records(root), out) == ["tiny-a: w4-mix"]
    png_size(out)
    with pytest.raises(ValueError, match="layer_bits"):
        plot_layer_heatmap([recs[1]], out)


@dataclass(frozen=True)
class _MixedPlan(QuantPlan):
    """down_proj of block 1 at 8 bits, o_proj everywhere in full precision."""

    def linear_args(self, block, layer):
        if layer == "o_proj":
            return QuantArgs(bits=16, target="weight"), QuantArgs(bits=16, dtype="fp8_e4m3", target="activation")
        if layer == "down_proj" and block == 1:
            return self.w.replace(bits=8), self.a
        return self.w, self.a


def test_layer_bits_table_asks_the_plan_per_layer():
    flags = dict(w_bits=4, w_group_size=128, a_bits=8)
    assert layer_bits_table(QuantPlan.from_flags(**flags), 3) is None  # uniform: nothing to draw
    base = QuantPlan.from_flags(**flags)
    table = layer_bits_table(_MixedPlan(**{f: getattr(base, f) for f in ("w", "a", "q", "k", "v", "p", "kv")}), 3)
    assert table["layers"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert table["w_bits"] == [[4, 4, 4, 16, 4, 4, 4], [4, 4, 4, 16, 4, 4, 8], [4, 4, 4, 16, 4, 4, 4]]
    assert table["a_bits"] == [[8, 8, 8, 16, 8, 8, 8]] * 3


def test_run_stores_the_layer_table_of_a_per_layer_plan(tmp_path, tiny_llama, isolated_cache):
    from wkvaq_quant.run import RunConfig, run

    base = QuantPlan.from_flags(w_bits=4, w_group_size=16, a_bits=8)
    plan = _MixedPlan(**{f: getattr(base, f) for f in ("w", "a", "q", "k", "v", "p", "kv")})
    rec = run(RunConfig(model=str(tiny_llama), seq_len=64, n_windows=1, results_dir=str(tmp_path), progress=False,
                        plan=plan), log=lambda msg: None)
    assert rec["layer_bits"]["w_bits"] == [[4, 4, 4, 16, 4, 4, 4], [4, 4, 4, 16, 4, 4, 8]]  # 2 blocks
    uniform = run(RunConfig(model=str(tiny_llama), seq_len=64, n_windows=1, results_dir=str(tmp_path / "u"),
                            progress=False, plan=base), log=lambda msg: None)
    assert "layer_bits" not in uniform
    assert plot_layer_heatmap(load_records(tmp_path / rec["model"]["name"]), tmp_path / "h.png") == [f"{rec['model']['name']}: "
                                                                               f"{rec['slug'].split('-float32')[0]}"]
