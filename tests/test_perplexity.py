"""Perplexity equals exp(mean NLL) computed independently; the control path is the same arithmetic."""
import math

import numpy as np
import pytest
import torch

from rcd.control.knn import KNNInterpolation
from rcd.datastore.tokens import Neighbours
from rcd.tasks.perplexity import score, windows


def reference_nll(model, ids):
    """Independent reference: one forward over the whole text, NLL of each next token."""
    with torch.no_grad():
        logits = model(ids.view(1, -1)).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none").numpy()


def test_windows_score_each_target_once():
    for n, w, s in [(10, 4, 2), (10, 4, 4), (7, 10, 5), (100, 16, 3)]:
        targets = [p + 1 for b, e, f in windows(n, w, s) for p in range(f, e - 1)]
        assert targets == list(range(1, n)), (n, w, s)


def test_perplexity_matches_exp_mean_nll(tiny_lm):
    text = "To be, or not to be, that is the question."
    ids = tiny_lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    ref = reference_nll(tiny_lm.model, ids)
    res = score(tiny_lm, ids, window=256, stride=128)
    np.testing.assert_allclose(res.nll_none, ref, rtol=1e-5, atol=1e-5)
    s = res.summary()
    assert s["tokens"] == len(ids) - 1
    assert abs(s["perplexity_none"] - math.exp(ref.mean())) < 1e-4 * math.exp(ref.mean())
    # bits per byte: total nats / ln 2 / bytes of the scored text
    assert abs(s["bits_per_byte_none"] - ref.sum() / math.log(2) / len(text[1:].encode())) < 1e-6


def test_sliding_window_uses_at_most_window_context(tiny_lm):
    text = "abcdefghij" * 5
    ids = tiny_lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    res = score(tiny_lm, ids, window=8, stride=4)
    # position 20 is scored in the window starting at 16: context ids[16..20]
    with torch.no_grad():
        lp = torch.log_softmax(tiny_lm.model(ids[16:24].view(1, -1)).logits[0], -1)
    assert abs(res.nll_none[20] + lp[4, ids[21]].item()) < 1e-5  # nll index 20 = target 21


class ConstStore:
    unit, metric = "tokens", "l2"

    def search(self, q, k):
        n = q.shape[0]
        return Neighbours(torch.zeros(n, 1), torch.zeros(n, 1, dtype=torch.long), torch.full((n, 1), 5), "l2")


def test_controlled_nll_is_the_mixture(tiny_lm):
    ids = tiny_lm.tokenizer("hello world, hello", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    lam = 0.3
    res = score(tiny_lm, ids, KNNInterpolation(k=1, lmbda=lam, temperature=1.0, datastore=ConstStore()))
    p_lm = np.exp(-res.nll_none)
    # p_kNN puts all mass on token 5
    expected = -np.log((1 - lam) * p_lm + lam * (ids[1:].numpy() == 5))
    np.testing.assert_allclose(res.nll, expected, rtol=1e-5, atol=1e-6)
    assert res.summary()["retrieval_rate"] == 1.0


def test_too_short_text_is_refused(tiny_lm):
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        score(tiny_lm, torch.tensor([3]))


def test_token_budget_spreads_over_documents_and_refills_short_ones():
    from rcd.tasks.lm import token_budget

    assert token_budget([100, 100], 10) == [5, 5]
    assert token_budget([100, 100, 100], 10) == [4, 3, 3]  # the remainder to the first documents
    assert token_budget([2, 100, 100], 10) == [2, 4, 4]  # a short document gives what it lacks to the others
    assert token_budget([3, 4], 100) == [3, 4] and token_budget([3, 4], None) == [3, 4]
    assert sum(token_budget([7, 1, 50, 9], 40)) == 40


def test_every_heldout_document_is_scored_on_its_own(tmp_path, tiny_lm):
    """Two held-out documents: each contributes its first tokens by the budget, scored separately (its first
    token is context only); the pooled NLLs equal the two fresh scores; results name the documents."""
    import datasets

    from rcd.strategy import Strategy
    from rcd.tasks.lm import heldout_docs, prompts_from, score_docs

    texts = ["To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer the slings\n",
             "Now is the winter of our discontent\nMade glorious summer by this sun of York;\nAnd all the clouds\n"]
    ds = datasets.Dataset.from_dict({"id": ["hamlet", "richard"], "text": texts})
    docs = heldout_docs(tiny_lm, ds, 40)
    assert [d["id"] for d in docs] == ["hamlet", "richard"] and [d["ids"].numel() for d in docs] == [20, 20]
    res = score_docs(tiny_lm, docs, Strategy("none"), window=16, stride=8)
    want = np.concatenate([score(tiny_lm, d["ids"], window=16, stride=8).nll_none for d in docs])
    np.testing.assert_allclose(res.nll_none, want)
    assert len(res.nll_none) == 38  # 19 + 19: each document's first token is context
    ids0 = tiny_lm.tokenizer(texts[0], add_special_tokens=False)["input_ids"][:20]
    assert docs[0]["ids"].tolist() == ids0
    # prompts come from the evaluated documents, after the scored text, round-robin
    assert prompts_from(docs, 2) == ["Whether 'tis nobler in the mind to suffer the slings\n",
                                         "Made glorious summer by this sun of York;\n"]
