"""lm-eval on the project's model objects: offline tasks, agreement with our perplexity, quantization seen.

How lm-eval's rolling loglikelihood relates to main.py's perplexity (the identity tested below):
lm-eval scores a document's tokens t[0..N) as the stream s = [prefix] + t (prefix = BOS, else
EOS) cut into non-overlapping windows s[kL : kL+L] of L = max_length tokens; each window predicts
its L next tokens, so the forward pass of window k is main.py's window s[kL : kL+L+1] (L+1
tokens, L predictions; the last input token is not needed). main.py instead cuts the corpus
itself into windows of L and predicts L-1 tokens per window: no prefix, and the first token of
each window is never predicted. The last, partial lm-eval window re-reads L tokens of context
and counts only its r remaining predictions.
"""

import json
import math

import pytest
import torch

import main as main_module
from tests.helpers import main_argv
from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.data import DataUnavailableError
from wkvaq_quant.eval.lm_eval import LMEvalSettings, evaluate_tasks, load_task_manager, local_tasks
from wkvaq_quant.eval.lm_tasks import MC_CHOICES, MC_DOCS, wiki_sample_mc_docs, wiki_sample_ppl_docs
from wkvaq_quant.eval.ppl import evaluate_perplexity
from wkvaq_quant.modeling import attach

PPL = "wkvaq_wiki_sample_ppl"
MC = "wkvaq_wiki_sample_mc"
TOL = 1e-3  # nats over the whole document (measured: 3e-5) (float32 log-softmax over windows of different lengths)
SHORT_DOC = 60  # a short article (a disambiguation page): a few hundred tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-lm-eval"))
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), path


def reference_rolling_nll(model, ids: list[int], prefix: int, L: int) -> float:
    """lm-eval's rolling NLL of a document from main.py's evaluate_perplexity on the windows lm-eval uses."""
    s = torch.tensor([prefix] + ids)
    N = len(ids)
    if N <= L:  # one window: [prefix] + t[:N-1] predicts all of t
        return evaluate_perplexity(model, s[None, : N + 1], progress=False).nll_sum
    n, r = divmod(N, L)
    full = torch.stack([s[k * L: k * L + L + 1] for k in range(n)])  # predicts t[0 : nL]
    nll = evaluate_perplexity(model, full, progress=False).nll_sum
    if r:  # last window reads s[N-L : N] and counts its last r predictions
        nll += evaluate_perplexity(model, s[None, N - L: N + 1], progress=False).nll_sum
        nll -= evaluate_perplexity(model, s[None, N - L: N - r + 1], progress=False).nll_sum
    return nll


def lm_eval_nll(model, tokenizer, L: int, doc: int = SHORT_DOC) -> float:
    settings = LMEvalSettings(tasks=(PPL,))
    scores, out = evaluate_tasks(model, tokenizer, settings, [PPL], load_task_manager([PPL]), max_length=L,
                                 log_samples=True, samples={PPL: [doc]})
    (sample,) = out["samples"][PPL]
    assert sample["doc_id"] == doc
    ll = sample["filtered_resps"][0]
    # the stored metric is the same number: word perplexity = exp(-ll / words)
    words = len(wiki_sample_ppl_docs()[doc]["text"].split())
    assert scores[PPL]["metrics"]["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-9)
    return -ll


def test_local_tasks_are_shipped():
    assert set(local_tasks()) == {PPL, MC}


def test_mc_task_data_is_deterministic_and_well_formed(isolated_cache):
    docs = wiki_sample_mc_docs()
    assert docs == wiki_sample_mc_docs() and len(docs) == MC_DOCS
    golds = [d["gold"] for d in docs]
    assert set(golds) == set(range(MC_CHOICES))  # the answer is not always in one place
    eval_text = "\n\n".join(d["text"] for d in wiki_sample_ppl_docs())
    for d in docs:
        assert len(d["choices"]) == MC_CHOICES == len(set(d["choices"]))
        assert f"{d['query']} {d['choices'][d['gold']]}" in " ".join(eval_text.split())  # a real sentence


@pytest.mark.parametrize("L", [128, 512])  # three windows (the last partial) / one window
def test_rolling_ppl_task_agrees_with_our_perplexity(tiny, isolated_cache, L):
    model, tokenizer, _ = tiny
    text = wiki_sample_ppl_docs()[SHORT_DOC]["text"]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert 256 < len(ids) < 512  # the parametrization covers both cases
    ours = reference_rolling_nll(model, ids, tokenizer.bos_token_id, L)
    assert lm_eval_nll(model, tokenizer, L) == pytest.approx(ours, abs=TOL)


def test_lm_eval_sees_the_quantized_model(tiny, isolated_cache):
    model, tokenizer, _ = tiny
    ids = tokenizer(wiki_sample_ppl_docs()[SHORT_DOC]["text"], add_special_tokens=False).input_ids
    fp = lm_eval_nll(model, tokenizer, 128)
    handle = attach(model, QuantPlan.from_flags(w_bits=2, w_group_size=16, a_bits=8, k_bits=2, v_bits=2))
    try:
        quant = lm_eval_nll(model, tokenizer, 128)
        ours = reference_rolling_nll(model, ids, tokenizer.bos_token_id, 128)
    finally:
        handle.remove()
    # a random tiny model predicts nearly uniformly, so any change is small in nats; compare it with
    # the float agreement between lm-eval's and our forward passes
    assert quant == pytest.approx(ours, abs=TOL)  # lm-eval sees exactly what our perplexity sees ...
    assert abs(quant - fp) > 50 * TOL  # ... and that differs from FP far beyond the tolerance (measured: 0.375)
    assert lm_eval_nll(model, tokenizer, 128) == pytest.approx(fp, rel=1e-9)  # removed: FP again


def test_main_tasks_flags_store_scores_next_to_perplexity(tiny, tmp_path, isolated_cache, capsys):
    _, _, path = tiny
    ppl = main_argv(path, tmp_path, "--seq_len", "128", "--n_windows", "2")
    assert main_module.main(ppl) == 0
    tasks = ppl + ["--tasks", MC, "--limit", "8"]
    assert main_module.main(tasks) == 0
    (file,) = (tmp_path / "results").rglob("*.json")
    rec = json.loads(file.read_text())
    assert set(rec["results"]) == {"wiki_sample"}  # the perplexity run is kept, not clobbered
    entry = rec["tasks"][f"{MC}[limit=8]"]
    assert entry["primary"] == "acc" and entry["n_samples"] == 8
    assert entry["metrics"]["acc"] * 8 == pytest.approx(round(entry["metrics"]["acc"] * 8))
    out = capsys.readouterr().out
    assert f"| {MC}[limit=8] | acc |" in out and "| wiki_sample | 2 | 128 |" in out

    quant = tasks + ["--w_bits", "2", "--w_group_size", "16"]  # another setting: another file
    assert main_module.main(quant) == 0
    assert len(list((tmp_path / "results").rglob("*.json"))) == 2


@pytest.mark.parametrize("flags,match", [
    (["--tasks", "no_such_task_xyz"], "--tasks: unknown task.*no_such_task_xyz.*wkvaq_wiki_sample_mc"),
    (["--tasks", MC, "--limit", "0"], "--limit 0.0"),
    (["--tasks", MC, "--limit", "2.5"], "--limit 2.5"),
    (["--tasks", MC, "--num_fewshot", "-1"], "--num_fewshot -1"),
    (["--tasks", f"{MC},{MC}"], "named twice"),
    (["--tasks", MC, "--apply_chat_template"], "--apply_chat_template: the model's tokenizer has no chat template"),
])
def test_bad_lm_eval_flags_fail_before_loading(tiny, tmp_path, isolated_cache, no_model_load, capsys, flags, match):
    import re

    try:
        code = main_module.main(main_argv(tiny[2], tmp_path, *flags))
    except SystemExit as err:
        code = err.code
    assert code == 2
    assert re.search(match, capsys.readouterr().err)


def test_hub_task_with_unreachable_hub_fails_fast(monkeypatch):
    from lm_eval.tasks import TaskManager

    from wkvaq_quant import hub

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(TaskManager, "__init__", lambda self, **kw: None)
    monkeypatch.setattr(TaskManager, "all_tasks", property(lambda self: ["arc_easy", "hellaswag", PPL, MC]),
                        raising=False)
    monkeypatch.setattr("lm_eval.tasks.get_task_dict", lambda *a, **k: pytest.fail("no dataset load without the hub"))
    with pytest.raises(DataUnavailableError, match="--tasks arc_easy,hellaswag: the Hugging Face hub is not reachable"
                                                   ".*HF_DATASETS_OFFLINE=1"):
        load_task_manager(["arc_easy", MC, "hellaswag"])


def test_hub_task_offline_gets_a_clear_message(monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # offline requested: the datasets cache is tried

    monkeypatch.setattr(TaskManager, "all_tasks", property(lambda self: ["arc_easy", PPL, MC]), raising=False)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr("lm_eval.tasks.get_task_dict", offline)
    monkeypatch.setattr(TaskManager, "__init__", lambda self, **kw: None)
    with pytest.raises(DataUnavailableError, match="--tasks arc_easy: its dataset could not be loaded.*ConnectionError"
                                                   ".*HF_DATASETS_OFFLINE=1.*wkvaq_wiki_sample_mc"):
        load_task_manager(["arc_easy"])
