"""Hooks of the offline task YAMLs in this directory (loaded by lm-eval's include_path)."""

import re

from wkvaq_quant.eval.lm_tasks import wiki_sample_mc_dataset, wiki_sample_ppl_dataset

__all__ = ["wiki_sample_ppl_dataset", "wiki_sample_mc_dataset", "ppl_process_results"]


def ppl_process_results(doc, results):
    """Per-document loglikelihood with the word and byte counts the perplexities are weighted by."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    n_bytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}
