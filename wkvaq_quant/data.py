"""Corpora for perplexity and calibration: WikiText-2, C4 and the embedded Wikipedia sample.

Evaluation follows the papers' protocol (GPTQ, AWQ, QuaRot, P3-LLM):
- wikitext2: the test split joined with "\\n\\n", cut into non-overlapping `seq_len` windows;
- c4: 256 random `seq_len` windows from the first validation shard, `random.seed(0)`;
- wiki_sample: the embedded corpus, non-overlapping windows like wikitext2.
Calibration always comes from a split disjoint from evaluation.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import hub
from .userfiles import UserError

__all__ = [
    "EVAL_DATASETS",
    "CALIB_DATASETS",
    "DataUnavailableError",
    "TextSource",
    "resolve_text_source",
    "check_datasets",
    "wiki_sample_texts",
    "wiki_sample_split_articles",
    "tokenize_corpus",
    "nonoverlapping_windows",
    "get_eval_windows",
    "get_calib_windows",
    "data_dir_from_env",
]

EVAL_DATASETS = ("wikitext2", "c4", "wiki_sample")
CALIB_DATASETS = ("wikitext2", "c4", "wiki_sample")
C4_N_WINDOWS = 256
C4_SEED = 0

_GENSIM_WIKI = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# every CALIB_EVERY-th article (index % CALIB_EVERY == CALIB_EVERY - 1) is calibration data
CALIB_EVERY = 5


class DataUnavailableError(UserError):
    """A requested corpus has no local copy and the hub cannot be reached."""


def data_dir_from_env() -> str | None:
    return os.environ.get("WKVAQ_DATA_DIR") or None


# ----------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class TextSource:
    """Where a corpus split comes from: a local file, the hub, or the embedded sample."""

    dataset: str
    split: str  # "eval" | "calib"
    kind: str  # "local" | "hub" | "embedded"
    location: str

    def describe(self) -> str:
        return f"{self.dataset}/{self.split} from {self.kind}: {self.location}"


_LOCAL_CANDIDATES: dict[tuple[str, str], list[str]] = {
    ("wikitext2", "eval"): [
        "wikitext/wikitext-2-raw-v1/test-00000-of-00001.parquet",
        "wikitext-2-raw-v1/test-00000-of-00001.parquet",
        "wikitext-2-raw/wiki.test.raw",
        "wiki.test.raw",
    ],
    ("wikitext2", "calib"): [
        "wikitext/wikitext-2-raw-v1/train-00000-of-00001.parquet",
        "wikitext-2-raw-v1/train-00000-of-00001.parquet",
        "wikitext-2-raw/wiki.train.raw",
        "wiki.train.raw",
    ],
    ("c4", "eval"): [
        "allenai/c4/en/c4-validation.00000-of-00008.json.gz",
        "c4/en/c4-validation.00000-of-00008.json.gz",
        "en/c4-validation.00000-of-00008.json.gz",
        "c4-validation.00000-of-00008.json.gz",
    ],
    ("c4", "calib"): [
        "allenai/c4/en/c4-train.00000-of-01024.json.gz",
        "c4/en/c4-train.00000-of-01024.json.gz",
        "en/c4-train.00000-of-01024.json.gz",
        "c4-train.00000-of-01024.json.gz",
    ],
}

_HUB_ARGS: dict[tuple[str, str], dict] = {
    ("wikitext2", "eval"): dict(path="wikitext", name="wikitext-2-raw-v1", split="test"),
    ("wikitext2", "calib"): dict(path="wikitext", name="wikitext-2-raw-v1", split="train"),
    ("c4", "eval"): dict(path="allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                         split="validation"),
    ("c4", "calib"): dict(path="allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                          split="train"),
}


def _gensim_wiki_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError("wiki_sample needs the 'gensim' package (pip install -r requirements.txt)")
    path = Path(list(spec.submodule_search_locations)[0]) / _GENSIM_WIKI
    if not path.is_file():
        raise DataUnavailableError(f"wiki_sample: the embedded corpus {path} is missing; reinstall gensim")
    return path


def resolve_text_source(dataset: str, split: str, data_dir: str | None = None) -> TextSource:
    """Find where `dataset`'s `split` comes from, without reading it. Fails fast offline."""
    if dataset not in EVAL_DATASETS:
        raise ValueError(f"--datasets: unknown dataset {dataset!r}; allowed values: {', '.join(EVAL_DATASETS)}")
    if split not in ("eval", "calib"):
        raise ValueError(f"split must be 'eval' or 'calib', got {split!r}")
    if dataset == "wiki_sample":
        return TextSource(dataset, split, "embedded", str(_gensim_wiki_path()))
    data_dir = data_dir or data_dir_from_env()
    if data_dir:
        for rel in _LOCAL_CANDIDATES[(dataset, split)]:
            path = Path(data_dir).expanduser() / rel
            if path.is_file():
                return TextSource(dataset, split, "local", str(path))
    offline = hub.offline_requested()
    if offline or not hub.hub_reachable():
        looked = f" (looked in --data_dir {data_dir} for {', '.join(_LOCAL_CANDIDATES[(dataset, split)])})" \
            if data_dir else ""
        if offline:
            # the user asked for offline mode: the datasets cache may still hold it
            return TextSource(dataset, split, "hub", json.dumps(_HUB_ARGS[(dataset, split)]))
        raise DataUnavailableError(
            f"--datasets {dataset}: the Hugging Face hub is not reachable and no local copy was found{looked}. "
            f"Put the original files under a directory and pass it with --data_dir (or WKVAQ_DATA_DIR): "
            f"for wikitext2 the hub's wikitext-2-raw-v1/test-00000-of-00001.parquet or the original "
            f"wikitext-2-raw/wiki.test.raw; for c4 en/c4-validation.00000-of-00008.json.gz. "
            f"Or use the embedded corpus: --datasets wiki_sample."
        )
    return TextSource(dataset, split, "hub", json.dumps(_HUB_ARGS[(dataset, split)]))


def check_datasets(names: list[str], data_dir: str | None = None, split: str = "eval") -> dict[str, TextSource]:
    """Validate `--datasets` names and locate each one; raises before any model work."""
    if not names:
        raise ValueError(f"--datasets: give at least one of {', '.join(EVAL_DATASETS)}")
    unknown = [n for n in names if n not in EVAL_DATASETS]
    if unknown:
        raise ValueError(f"--datasets: unknown dataset(s) {', '.join(unknown)}; allowed values: {', '.join(EVAL_DATASETS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--datasets: {','.join(names)} names a dataset twice")
    return {n: resolve_text_source(n, split, data_dir) for n in names}


# ----------------------------------------------------------------------------- reading

_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$")
_EMPHASIS = re.compile(r"'{2,}")
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")
_SPACES = re.compile(r"[ \t]+")


def _clean_wiki(text: str) -> str:
    """Deterministic plain text from gensim's `filter_wiki` output.

    Bold/italic quotes removed, headings written as "= = Title = =" (WikiText style),
    empty parentheses left by removed templates dropped, runs of spaces collapsed,
    at most one blank line between paragraphs.
    """
    lines = []
    for raw in text.split("\n"):
        line = _SPACES.sub(" ", _EMPTY_PARENS.sub("", _EMPHASIS.sub("", raw))).strip()
        m = _HEADING.match(line)
        if m:
            level = len(m.group(1))
            line = f"{' '.join('=' * level)} {m.group(2)} {' '.join('=' * level)}"
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def wiki_sample_texts(path: str | None = None) -> list[tuple[str, str]]:
    """(title, plain text) of every article in the embedded Wikipedia dump, in file order."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = path or str(_gensim_wiki_path())
    articles = []
    with bz2.open(path) as fh:
        for title, text, _pageid in extract_pages(fh, filter_namespaces=("0",)):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            body = _clean_wiki(filter_wiki(text))
            if body:
                articles.append((title, body))
    return articles


def _wiki_sample_articles(path: str) -> list[tuple[str, str]]:
    """`wiki_sample_texts`, cached as JSON (the markup stripping takes seconds)."""
    from .models import cache_dir

    st = os.stat(path)
    key = hashlib.sha256(f"{path}:{st.st_size}:{int(st.st_mtime)}:v1".encode()).hexdigest()[:16]
    cached = cache_dir() / "corpora" / f"wiki_sample-{key}.json"
    if cached.is_file():
        with open(cached, encoding="utf-8") as fh:
            return [tuple(a) for a in json.load(fh)]
    articles = wiki_sample_texts(path)
    from .results import atomic_write_json

    atomic_write_json(cached, articles)
    return articles


def wiki_sample_split_articles(split: str, path: str | None = None) -> list[str]:
    """The articles of one wiki_sample split ("eval" or "calib") as `= Title =\n\nbody`, in order;
    the split's text is these joined with "\n\n"."""
    articles = _wiki_sample_articles(path or str(_gensim_wiki_path()))
    return [f"= {title} =\n\n{body}" for i, (title, body) in enumerate(articles)
            if (i % CALIB_EVERY == CALIB_EVERY - 1) == (split == "calib")]


def _wiki_sample_split(split: str, path: str) -> str:
    return "\n\n".join(wiki_sample_split_articles(split, path))


def _wikitext_rows_from_raw(path: str) -> list[str]:
    # the hub's wikitext rows are the raw file's lines, newline kept, blank lines as ""
    with open(path, encoding="utf-8") as fh:
        return [line if line.strip() else "" for line in fh]


def _read_rows(source: TextSource) -> list[str]:
    """Rows of text (wikitext lines or c4 documents) from a local file or the hub."""
    if source.kind == "local":
        path = source.location
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(path, columns=["text"]).column("text").to_pylist()
        if path.endswith(".json.gz"):
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return [json.loads(line)["text"] for line in fh if line.strip()]
        return _wikitext_rows_from_raw(path)
    if source.kind == "hub":
        import datasets

        try:
            ds = datasets.load_dataset(**json.loads(source.location))
        except Exception as err:  # offline with an empty cache, gated, renamed...
            raise DataUnavailableError(
                f"--datasets {source.dataset}: loading from the hub failed ({type(err).__name__}: {err}). "
                f"Provide a local copy with --data_dir or use --datasets wiki_sample."
            ) from err
        return list(ds["text"])
    raise ValueError(f"no row reader for {source.describe()}")


def _corpus_text(source: TextSource) -> str:
    """The single string the protocol tokenizes for a non-overlapping-window corpus."""
    if source.dataset == "wiki_sample":
        return _wiki_sample_split(source.split, source.location)
    if source.dataset == "wikitext2":
        # GPTQ protocol: test joined with "\n\n", train joined with " "
        return ("\n\n" if source.split == "eval" else " ").join(_read_rows(source))
    raise ValueError(f"{source.dataset} is not a single-stream corpus")


# ----------------------------------------------------------------------------- tokenization + cache

def tokenizer_fingerprint(tokenizer) -> str:
    """Stable hash of a tokenizer's full definition (vocab, merges, normalizers)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:
        payload = json.dumps([type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer)])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _token_cache_dir() -> Path:
    from .models import cache_dir

    return cache_dir() / "tokens"


def _cached(key: dict, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Load a token tensor cached under `key`, or build it and save it atomically."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = _token_cache_dir() / f"{key['dataset']}-{key['split']}-{digest}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:
            path.unlink(missing_ok=True)  # a corrupt cache entry is rebuilt
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(value, tmp)
    os.replace(tmp, path)
    return value


def _source_key(source: TextSource) -> dict:
    loc = source.location
    stat = ""
    if source.kind in ("local", "embedded"):
        st = os.stat(loc)
        stat = f"{st.st_size}:{int(st.st_mtime)}"
    return {"dataset": source.dataset, "split": source.split, "kind": source.kind, "location": loc, "stat": stat}


def tokenize_corpus(source: TextSource, tokenizer, add_special_tokens: bool) -> torch.Tensor:
    """1-D int64 token ids of a single-stream corpus (cached on disk)."""
    key = {**_source_key(source), "tokenizer": tokenizer_fingerprint(tokenizer),
           "add_special_tokens": add_special_tokens, "v": 1}

    def build() -> torch.Tensor:
        text = _corpus_text(source)
        ids = tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        return torch.tensor(ids, dtype=torch.int64)

    return _cached(key, build)


def nonoverlapping_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[n, seq_len] windows ids[i*seq_len:(i+1)*seq_len]; the short tail is dropped."""
    if seq_len <= 0:
        raise ValueError(f"--seq_len must be positive, got {seq_len}")
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def _c4_windows(rows: list[str], tokenizer, seq_len: int, n: int, seed: int, add_special_tokens: bool,
                what: str) -> torch.Tensor:
    """GPTQ's C4 sampling: a random document longer than seq_len, then a random window in it."""
    rng = random.Random(seed)
    windows = []
    for _ in range(n):
        for _attempt in range(100_000):
            doc = rng.randint(0, len(rows) - 1)
            ids = tokenizer(rows[doc], add_special_tokens=add_special_tokens).input_ids
            if len(ids) > seq_len:
                break
        else:
            raise ValueError(f"{what}: no document longer than seq_len={seq_len} tokens")
        start = rng.randint(0, len(ids) - seq_len - 1)
        windows.append(ids[start: start + seq_len])
    return torch.tensor(windows, dtype=torch.int64)


def get_eval_windows(source: TextSource, tokenizer, seq_len: int, add_special_tokens: bool) -> torch.Tensor:
    """All evaluation windows [n, seq_len] of a corpus, by the papers' protocol."""
    if seq_len <= 0:
        raise ValueError(f"--seq_len must be positive, got {seq_len}")
    if source.dataset == "c4":
        key = {**_source_key(source), "tokenizer": tokenizer_fingerprint(tokenizer),
               "add_special_tokens": add_special_tokens, "seq_len": seq_len, "n": C4_N_WINDOWS,
               "seed": C4_SEED, "v": 1}
        return _cached(key, lambda: _c4_windows(_read_rows(source), tokenizer, seq_len, C4_N_WINDOWS, C4_SEED,
                                                add_special_tokens, "--datasets c4"))
    return nonoverlapping_windows(tokenize_corpus(source, tokenizer, add_special_tokens), seq_len)


def get_calib_windows(source: TextSource, tokenizer, n_samples: int, seq_len: int, seed: int,
                      add_special_tokens: bool) -> torch.Tensor:
    """[n_samples, seq_len] calibration windows from the calibration split (GPTQ sampling).

    wikitext2 / wiki_sample: random start positions in the tokenized calibration stream;
    c4: random documents of the first train shard, then a random window.
    """
    if source.split != "calib":
        raise ValueError(f"calibration data must come from the calibration split, got {source.describe()}")
    if n_samples <= 0:
        raise ValueError(f"--n_calib must be positive, got {n_samples}")
    if seq_len <= 0:
        raise ValueError(f"--calib_seq_len must be positive, got {seq_len}")
    if source.dataset == "c4":
        return _c4_windows(_read_rows(source), tokenizer, seq_len, n_samples, seed, add_special_tokens,
                           "--calib_dataset c4")
    ids = tokenize_corpus(source, tokenizer, add_special_tokens)
    if ids.numel() <= seq_len:
        raise ValueError(f"--calib_seq_len {seq_len} is longer than the calibration split ({ids.numel()} tokens)")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seq_len - 1) for _ in range(n_samples)]
    return torch.stack([ids[s: s + seq_len] for s in starts])
