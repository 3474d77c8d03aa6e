import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import FAMILY_CHECKPOINTS
from wkvaq_quant.eval.ppl import NonFiniteLossError, evaluate_perplexity


def reference_ppl(model, windows: torch.Tensor) -> float:
    """Slow reference: for every position t, run the prefix ids[:t] alone and score ids[t]."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            for t in range(1, window.numel()):
                logits = model(input_ids=window[None, :t]).logits[0, -1].double()
                nll -= torch.log_softmax(logits, dim=-1)[window[t]].item()
                count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_mistral", *FAMILY_CHECKPOINTS])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_ppl_matches_prefix_by_prefix_reference(fixture, batch_size, request):
    path = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, model.config.vocab_size, (3, 24), generator=g)
    res = evaluate_perplexity(model, windows, batch_size=batch_size, progress=False)
    ref = reference_ppl(model, windows)
    assert res.windows == 3 and res.tokens == 3 * 23 and res.seq_len == 24
    assert res.ppl == pytest.approx(ref, rel=1e-5)
    # a random model over a ~320-token vocabulary is near-uniform, not near 1
    assert 50 < res.ppl < 2000


def test_ppl_nonfinite_loss_is_an_error(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    windows = torch.randint(0, model.config.vocab_size, (2, 8))
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        evaluate_perplexity(model, windows, progress=False)


def test_ppl_rejects_bad_windows(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with pytest.raises(ValueError, match="windows"):
        evaluate_perplexity(model, torch.zeros(0, 8, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="--batch_size"):
        evaluate_perplexity(model, torch.zeros(1, 8, dtype=torch.long), batch_size=0, progress=False)
