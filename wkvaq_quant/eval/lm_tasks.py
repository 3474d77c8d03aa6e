"""Data of the offline lm-eval tasks in `lm-evaluation-harness/`, made from the embedded corpus.

Each builder writes a JSON file (one document per line) under `$WKVAQ_CACHE/lm_eval/`,
deterministically and atomically, and loads it with `datasets.load_dataset("json", ...)`;
nothing is downloaded. The task YAMLs call these through `custom_dataset`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

from ..data import wiki_sample_split_articles

__all__ = ["wiki_sample_ppl_docs", "wiki_sample_mc_docs", "wiki_sample_ppl_dataset", "wiki_sample_mc_dataset",
           "MC_DOCS", "MC_CHOICES"]

MC_DOCS = 200
MC_CHOICES = 4
MC_SEED = 1234
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def wiki_sample_ppl_docs() -> list[dict]:
    """One document per evaluation article of wiki_sample (`= Title =\\n\\nbody`, the pieces that
    main.py joins with "\\n\\n")."""
    return [{"text": a} for a in wiki_sample_split_articles("eval")]


def _sentences() -> list[tuple[int, str]]:
    """(article index, sentence) for plain prose sentences of 12-40 words of the evaluation articles."""
    out = []
    for i, article in enumerate(wiki_sample_split_articles("eval")):
        for para in article.split("\n"):
            if not para.strip() or para.lstrip().startswith("="):
                continue
            for s in _SENTENCE_END.split(para.strip()):
                words = s.split()
                if 12 <= len(words) <= 40 and s[0].isupper() and s[-1] in ".!?":
                    out.append((i, " ".join(words)))
    return out


def wiki_sample_mc_docs(n: int = MC_DOCS) -> list[dict]:
    """Sentence completion: the first half of a sentence, its true second half and the second halves
    of sentences from three other articles. Sentences and distractors are drawn with a fixed seed."""
    rng = random.Random(MC_SEED)
    sents = _sentences()
    if len(sents) < n * MC_CHOICES:
        raise ValueError(f"wiki_sample has only {len(sents)} usable sentences for {n} documents")
    picked = rng.sample(range(len(sents)), n)
    docs = []
    for idx in picked:
        article, sentence = sents[idx]
        words = sentence.split()
        cut = len(words) // 2
        query, answer = " ".join(words[:cut]), " ".join(words[cut:])
        distractors: list[str] = []
        while len(distractors) < MC_CHOICES - 1:
            other_article, other = sents[rng.randrange(len(sents))]
            ow = other.split()
            ending = " ".join(ow[len(ow) // 2:])
            if other_article != article and ending != answer and ending not in distractors:
                distractors.append(ending)
        gold = rng.randrange(MC_CHOICES)
        choices = distractors[:gold] + [answer] + distractors[gold:]
        docs.append({"query": query, "choices": choices, "gold": gold})
    return docs


def _cache_file(name: str, docs: list[dict]) -> Path:
    from ..models import cache_dir
    from ..results import atomic_write_text

    text = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = cache_dir() / "lm_eval" / f"{name}-{digest}.jsonl"
    if not path.is_file():
        atomic_write_text(path, text)
    return path


def _load_json(name: str, docs: list[dict]):
    import datasets

    path = _cache_file(name, docs)
    return datasets.load_dataset("json", data_files={"test": str(path)})


def wiki_sample_ppl_dataset(**_metadata):
    """`custom_dataset` of the wkvaq_wiki_sample_ppl task (lm-eval passes its metadata; unused)."""
    return _load_json("wiki_sample_ppl", wiki_sample_ppl_docs())


def wiki_sample_mc_dataset(**_metadata):
    """`custom_dataset` of the wkvaq_wiki_sample_mc task."""
    return _load_json("wiki_sample_mc", wiki_sample_mc_docs())
