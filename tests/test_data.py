import gzip
import json
import time

import pytest
import torch
from transformers import AutoTokenizer

from wkvaq_quant import data, hub
from wkvaq_quant.data import (
    DataUnavailableError,
    TextSource,
    check_datasets,
    get_calib_windows,
    get_eval_windows,
    nonoverlapping_windows,
    resolve_text_source,
)


@pytest.fixture
def tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.mark.parametrize("n_tokens,seq_len", [(100, 10), (105, 10), (9, 10), (2048 * 3 + 7, 2048)])
def test_windows_count_no_overlap_exact_coverage(n_tokens, seq_len):
    ids = torch.arange(n_tokens)
    w = nonoverlapping_windows(ids, seq_len)
    assert w.shape == (n_tokens // seq_len, seq_len)
    flat = w.flatten()
    # exact coverage of the prefix, each token once, in order: no overlap, no gap
    assert torch.equal(flat, torch.arange(w.numel()))
    assert n_tokens - w.numel() < seq_len


@pytest.mark.parametrize("seq_len", [0, -5])
def test_windows_reject_nonpositive_seq_len(seq_len):
    with pytest.raises(ValueError, match="--seq_len"):
        nonoverlapping_windows(torch.arange(10), seq_len)


def test_wiki_sample_eval_and_calib_are_disjoint_articles():
    path = resolve_text_source("wiki_sample", "eval").location
    articles = data._wiki_sample_articles(path)
    assert len(articles) > 50
    eval_text = data._wiki_sample_split("eval", path)
    calib_text = data._wiki_sample_split("calib", path)
    titles_eval = {t for i, (t, _) in enumerate(articles) if i % data.CALIB_EVERY != data.CALIB_EVERY - 1}
    titles_calib = {t for i, (t, _) in enumerate(articles) if i % data.CALIB_EVERY == data.CALIB_EVERY - 1}
    assert titles_eval.isdisjoint(titles_calib) and titles_calib
    for t in titles_calib:
        assert f"= {t} =\n" in calib_text and f"= {t} =\n" not in eval_text
    for t in titles_eval:
        assert f"= {t} =\n" in eval_text and f"= {t} =\n" not in calib_text
    # markup is stripped deterministically
    assert "'''" not in eval_text and "[[" not in eval_text and "{{" not in eval_text
    assert data._wiki_sample_split("eval", path) == eval_text


def test_calibration_windows_come_from_calibration_stream(isolated_cache, tok):
    calib_src = resolve_text_source("wiki_sample", "calib")
    eval_src = resolve_text_source("wiki_sample", "eval")
    w = get_calib_windows(calib_src, tok, n_samples=4, seq_len=64, seed=3, add_special_tokens=False)
    assert w.shape == (4, 64)
    # byte-level BPE is lossless, so a window decodes to a substring of the text it came from
    calib_text = data._wiki_sample_split("calib", calib_src.location)
    eval_text = data._wiki_sample_split("eval", eval_src.location)
    for row in w:
        piece = tok.decode(row)
        assert piece in calib_text
        assert piece not in eval_text
    again = get_calib_windows(calib_src, tok, n_samples=4, seq_len=64, seed=3, add_special_tokens=False)
    assert torch.equal(w, again)
    other = get_calib_windows(calib_src, tok, n_samples=4, seq_len=64, seed=4, add_special_tokens=False)
    assert not torch.equal(w, other)
    with pytest.raises(ValueError, match="calibration split"):
        get_calib_windows(eval_src, tok, 4, 64, 0, False)
    with pytest.raises(ValueError, match="--n_calib"):
        get_calib_windows(calib_src, tok, 0, 64, 0, False)


def test_token_cache_is_reused(isolated_cache, tok):
    src = resolve_text_source("wiki_sample", "eval")
    first = data.tokenize_corpus(src, tok, False)
    files = list((isolated_cache / "tokens").glob("wiki_sample-eval-*.pt"))
    assert files
    start = time.perf_counter()
    second = data.tokenize_corpus(src, tok, False)
    assert time.perf_counter() - start < 1.0
    assert torch.equal(first, second)


def _write_wikitext_local(root, rows_test, rows_train):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = root / "wikitext" / "wikitext-2-raw-v1"
    d.mkdir(parents=True)
    pq.write_table(pa.table({"text": rows_test}), d / "test-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": rows_train}), d / "train-00000-of-00001.parquet")


def test_wikitext2_local_parquet_and_raw_agree(tmp_path, isolated_cache, tok):
    raw_lines = [" = Valkyria Chronicles III = \n", "\n", " Senjō no Valkyria 3 is a game . \n", "\n",
                 " It was released in 2011 . \n"]
    rows = [line if line.strip() else "" for line in raw_lines]  # the hub's rows
    _write_wikitext_local(tmp_path / "pq", rows, rows)
    (tmp_path / "raw" / "wikitext-2-raw").mkdir(parents=True)
    (tmp_path / "raw" / "wikitext-2-raw" / "wiki.test.raw").write_text("".join(raw_lines), encoding="utf-8")
    src_pq = resolve_text_source("wikitext2", "eval", str(tmp_path / "pq"))
    src_raw = resolve_text_source("wikitext2", "eval", str(tmp_path / "raw"))
    assert src_pq.kind == src_raw.kind == "local"
    text = data._corpus_text(src_pq)
    assert text == "\n\n".join(rows)  # the papers' join
    assert data._corpus_text(src_raw) == text
    w = get_eval_windows(src_pq, tok, 8, add_special_tokens=False)
    ids = tok(text, add_special_tokens=False).input_ids
    assert w.shape == (len(ids) // 8, 8)
    assert w.flatten().tolist() == ids[: w.numel()]


def test_c4_local_sampling_follows_gptq_protocol(tmp_path, isolated_cache, tok):
    import random

    docs = [f"doc {i} " + "word " * (5 + 7 * i) for i in range(30)]
    d = tmp_path / "c4" / "en"
    d.mkdir(parents=True)
    with gzip.open(d / "c4-validation.00000-of-00008.json.gz", "wt", encoding="utf-8") as fh:
        for text in docs:
            fh.write(json.dumps({"text": text, "timestamp": "x", "url": "y"}) + "\n")
    src = resolve_text_source("c4", "eval", str(tmp_path))
    seq_len = 16
    w = get_eval_windows(src, tok, seq_len, add_special_tokens=False)
    assert w.shape == (256, seq_len)
    # independent re-implementation of the sampling loop with random.seed(0)
    random.seed(0)
    expected = []
    for _ in range(256):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = tok(docs[i], add_special_tokens=False).input_ids
            if len(ids) > seq_len:
                break
        s = random.randint(0, len(ids) - seq_len - 1)
        expected.append(ids[s: s + seq_len])
    assert w.tolist() == expected


def test_offline_hub_dataset_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("WKVAQ_DATA_DIR", raising=False)
    start = time.perf_counter()
    for name in ("wikitext2", "c4"):
        with pytest.raises(DataUnavailableError) as err:
            check_datasets([name], data_dir=str(tmp_path))
        msg = str(err.value)
        assert f"--datasets {name}" in msg and "--data_dir" in msg and "wiki_sample" in msg
    assert time.perf_counter() - start < 2.0


def test_unknown_dataset_named_in_error():
    with pytest.raises(ValueError, match=r"--datasets.*wikitext3.*allowed values: wikitext2, c4, wiki_sample"):
        check_datasets(["wikitext3"])


def test_sources_describe_themselves():
    src = TextSource("wikitext2", "eval", "local", "/x/wiki.test.raw")
    assert src.describe() == "wikitext2/eval from local: /x/wiki.test.raw"
