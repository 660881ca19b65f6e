"""kNN-LM mixing against hand-computed numbers."""
import math

import torch
from transformers import LogitsProcessorList

from rcd.control.knn import KNNInterpolation, interpolate, knn_log_probs
from rcd.datastore.tokens import Neighbours


def test_knn_distribution_three_token_vocab():
    # neighbours at squared distances 1, 2, 3 with next tokens 0, 2, 0; T = 1
    d = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[0, 2, 0]])
    w = [math.exp(-1), math.exp(-2), math.exp(-3)]
    z = sum(w)
    expected = torch.tensor([[(w[0] + w[2]) / z, 0.0, w[1] / z]])  # [0.7553, 0, 0.2447]
    got = knn_log_probs(d, t, 3, temperature=1.0).exp()
    assert torch.allclose(got, expected, atol=1e-6)
    assert abs(got[0, 0].item() - 0.755272) < 1e-5


def test_temperature_flattens_large_distances():
    # distances of the scale seen with SmolLM2 (~285): T = 1 is one-hot, T = 100 spreads mass
    d = torch.tensor([[280.0, 285.0]])
    t = torch.tensor([[0, 1]])
    sharp = knn_log_probs(d, t, 2, 1.0).exp()[0]
    soft = knn_log_probs(d, t, 2, 100.0).exp()[0]
    assert sharp[0] > 0.99
    assert abs(soft[0].item() - 1 / (1 + math.exp(-0.05))) < 1e-6  # sigmoid(5/100) = 0.5125


def test_interpolation_by_hand():
    # p_LM = [0.5, 0.3, 0.2], p_kNN = [0.7553, 0, 0.2447], λ = 0.25
    p_lm = torch.tensor([[0.5, 0.3, 0.2]])
    p_knn = torch.tensor([[0.7552715, 0.0, 0.2447285]])
    got = interpolate(p_lm.log(), p_knn.log(), 0.25).exp()
    expected = torch.tensor([[0.75 * 0.5 + 0.25 * 0.7552715, 0.75 * 0.3, 0.75 * 0.2 + 0.25 * 0.2447285]])
    assert torch.allclose(got, expected, atol=1e-6)  # [0.56382, 0.225, 0.21118]
    assert abs(got.sum().item() - 1) < 1e-6


class FakeStore:
    unit, metric = "tokens", "l2"

    def __init__(self, scores, tokens):
        self.scores, self.tokens = scores, tokens
        self.queries = []

    def search(self, q, k):
        self.queries.append(q.clone())
        n = q.shape[0]
        return Neighbours(self.scores.expand(n, -1)[:, :k], torch.zeros(n, k, dtype=torch.long),
                          self.tokens.expand(n, -1)[:, :k], "l2")


def test_processor_apply_and_fire_mask():
    store = FakeStore(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0, 2, 0]]))
    ctl = KNNInterpolation(k=3, lmbda=0.25, temperature=1.0, datastore=store)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    out = ctl.apply(logits, hidden=torch.zeros(2, 4), fire=torch.tensor([True, False])).exp()
    assert torch.allclose(out[0], torch.tensor([0.563818, 0.225, 0.211182]), atol=1e-5)
    assert torch.allclose(out[1], torch.tensor([0.1, 0.1, 0.8]), atol=1e-6)  # did not fire: unchanged
    assert store.queries[-1].shape[0] == 1  # only the firing row was searched


def test_processor_in_logits_processor_list_uses_captured_state():
    store = FakeStore(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0, 2, 0]]))

    class Cap:
        hidden = torch.arange(12.0).view(1, 3, 4)  # [B, T, H]; last position is the query

    ctl = KNNInterpolation(k=3, lmbda=0.25, temperature=1.0, datastore=store, capture=Cap())
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    out = LogitsProcessorList([ctl])(torch.zeros(1, 3, dtype=torch.long), scores)
    assert torch.allclose(out.exp(), torch.tensor([[0.563818, 0.225, 0.211182]]), atol=1e-5)
    assert torch.equal(store.queries[-1], torch.tensor([[8.0, 9.0, 10.0, 11.0]]))


def test_bad_parameters_are_refused():
    import pytest

    for kw in ({"k": 0}, {"lmbda": 1.5}, {"temperature": 0}):
        with pytest.raises(ValueError):
            KNNInterpolation(**kw)
