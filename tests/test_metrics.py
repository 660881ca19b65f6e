"""rcd.metrics: hand-computed answer, retrieval, diversity and bootstrap cases; the evaluate
modules loaded by path must give the same numbers as the pure functions."""
from __future__ import annotations

import numpy as np
import pytest

from rcd.metrics import (
    METRICS,
    answer_in_prediction_score,
    bootstrap_ci,
    distinct_n,
    exact_match_score,
    load_metric,
    metric_path,
    normalize_answer,
    recall_at_k,
    token_f1_score,
)


# --------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize(
    "raw, norm",
    [
        ("The  Cat!", "cat"),
        ("An apple, a day.", "apple day"),
        ("  theatre  ", "theatre"),  # articles only as whole words
        ("Jean-Paul  Sartre", "jeanpaul sartre"),
        ("1564", "1564"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


# --------------------------------------------------------------------------- exact match
def test_exact_match_multiple_references():
    assert exact_match_score("Paris", ["London", "paris."]) == 1.0
    assert exact_match_score("the Paris", ["Paris"]) == 1.0
    assert exact_match_score("Paris France", ["Paris", "France"]) == 0.0
    assert exact_match_score("1564", ["1564"]) == 1.0
    with pytest.raises(ValueError):
        exact_match_score("x", [])
    with pytest.raises(TypeError):
        exact_match_score("x", "x")


# --------------------------------------------------------------------------- answer in prediction
@pytest.mark.parametrize(
    "prediction, references, score",
    [
        ("The chemical symbol of palladium is Pd.", ["Pd"], 1.0),  # punctuation and case
        ("Palladium's symbol is PD", ["pd"], 1.0),
        ("It was discovered in 1807.", ["7"], 0.0),  # whole tokens only: "7" is not in "1807"
        ("Its atomic number is 17.", ["7"], 0.0),
        ("Its atomic number is 7.", ["7"], 1.0),
        ("The answer: 7", ["7"], 1.0),
        ("The symbol of hydrogen is H.", ["H"], 1.0),
        ("Hydrogen", ["H"], 0.0),  # "h" is not a token of "hydrogen"
        ("He was born in New York City.", ["New York"], 1.0),  # multi-word reference, contiguous
        ("New jersey, not York", ["New York"], 0.0),  # tokens present but not as a sequence
        ("York New", ["New York"], 0.0),
        ("It is an Eiffel Tower.", ["the Eiffel tower!"], 1.0),  # articles and punctuation dropped on both sides
        ("Paris", ["London", "paris."], 1.0),  # any of several references
        ("Period 4, group 10", ["3", "10"], 1.0),
        ("Period 4, group 10", ["3", "11"], 0.0),
        ("", ["Pd"], 0.0),  # empty prediction
        ("...", ["7"], 0.0),  # normalises to nothing
        ("", ["the"], 1.0),  # empty reference: only an empty prediction (as exact match)
        ("Pd", ["a"], 0.0),  # an empty reference is never trivially contained
        ("Jean-Paul Sartre wrote it", ["Jean-Paul"], 1.0),  # same hyphen handling on both sides
        ("Alvar Aalto (1898-1976)", ["1898"], 1.0),  # words split at punctuation: year ranges
        ("born 1898-1976", ["976"], 0.0),
        ("U.S.", ["US"], 1.0),  # an exact match counts even when the word split differs
    ],
)
def test_answer_in_prediction_hand_computed(prediction, references, score):
    assert answer_in_prediction_score(prediction, references) == score
    # containment is never below exact match
    assert answer_in_prediction_score(prediction, references) >= exact_match_score(prediction, references)


def test_answer_in_prediction_checks_references():
    with pytest.raises(ValueError):
        answer_in_prediction_score("x", [])
    with pytest.raises(TypeError):
        answer_in_prediction_score("x", "x")


# --------------------------------------------------------------------------- token F1
def test_token_f1_partial_overlap():
    # "the" is dropped: [big, red, dog] vs [red, dog, barks]; 2 common -> P = R = 2/3
    assert token_f1_score("the big red dog", ["red dog barks"]) == pytest.approx(2 / 3)
    assert round(token_f1_score("the big red dog", ["red dog barks"]), 4) == 0.6667
    # max over references
    assert token_f1_score("the big red dog", ["red dog barks", "big red dog"]) == 1.0
    # repeated tokens count once per match: P = 1/2, R = 1 -> F1 = 2/3
    assert token_f1_score("dog dog", ["dog"]) == pytest.approx(2 / 3)
    # P = 1/1, R = 1/4 -> F1 = 0.4
    assert token_f1_score("shakespeare", ["William Shakespeare of Stratford"]) == pytest.approx(0.4)
    assert token_f1_score("cat", ["dog"]) == 0.0
    assert token_f1_score("", [""]) == 1.0
    assert token_f1_score("the", ["a"]) == 1.0  # both normalise to nothing
    assert token_f1_score("", ["cat"]) == 0.0


# --------------------------------------------------------------------------- recall@k
def test_recall_at_k():
    retrieved = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    gold = ["b", "f", "x"]
    assert recall_at_k(retrieved, gold, 1) == 0.0
    assert recall_at_k(retrieved, gold, 2) == pytest.approx(1 / 3)
    assert recall_at_k(retrieved, gold, 3) == pytest.approx(2 / 3)
    assert recall_at_k(retrieved, gold, 10) == pytest.approx(2 / 3)
    # a collection of gold ids: a hit on any counts
    assert recall_at_k(retrieved, [["x", "a"], {"e"}, ("y",)], 2) == pytest.approx(2 / 3)
    for bad_k in (0, -1, 1.5):
        with pytest.raises(ValueError):
            recall_at_k(retrieved, gold, bad_k)
    with pytest.raises(ValueError):
        recall_at_k(retrieved, gold[:2], 1)
    with pytest.raises(ValueError):
        recall_at_k([], [], 1)


# --------------------------------------------------------------------------- distinct-n
def test_distinct_n():
    texts = ["the cat sat on the mat", "the cat ran"]
    # unigrams: 9 in all, 6 distinct (the cat sat on mat ran)
    assert distinct_n(texts, 1) == pytest.approx(6 / 9)
    # bigrams: 5 + 2 = 7, "the cat" twice -> 6 distinct; "mat the" (across texts) not counted
    assert distinct_n(texts, 2) == pytest.approx(6 / 7)
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(["a a a a"], 1) == 0.25
    assert distinct_n(["a b"], 4) == 0.0
    assert distinct_n([], 1) == 0.0
    assert distinct_n("a b a", 1) == pytest.approx(2 / 3)  # one string = one text
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci():
    sample = [0, 1, 1, 0, 1, 1, 1, 0, 1, 1]
    mean, low, high = bootstrap_ci(sample, n_resamples=2000, seed=0)
    assert mean == 0.7
    assert 0.0 <= low < mean < high <= 1.0
    assert bootstrap_ci(sample, n_resamples=2000, seed=0) == (mean, low, high)
    assert bootstrap_ci(sample, n_resamples=2000, seed=1) != (mean, low, high)

    # the same proportion in a 10x larger sample gives a narrower interval
    m2, low2, high2 = bootstrap_ci(sample * 10, n_resamples=2000, seed=0)
    assert m2 == pytest.approx(0.7)
    assert high2 - low2 < high - low
    assert low2 <= m2 <= high2

    # it is the percentile bootstrap of the mean
    x = np.asarray(sample, dtype=float)
    idx = np.random.default_rng(0).integers(0, x.size, size=(2000, x.size))
    ref = np.quantile(x[idx].mean(axis=1), [0.025, 0.975])
    assert (low, high) == pytest.approx(tuple(ref))

    # a wider alpha gives a narrower interval; constants have no spread
    _, l90, h90 = bootstrap_ci(sample, n_resamples=2000, seed=0, alpha=0.1)
    assert low <= l90 and h90 <= high
    assert bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0, 3.0)
    assert all(isinstance(v, float) for v in bootstrap_ci(sample))

    # large samples resample in chunks and stay deterministic
    big = np.random.default_rng(5).normal(size=20_000)
    assert bootstrap_ci(big, n_resamples=300, seed=2) == bootstrap_ci(big, n_resamples=300, seed=2)
    m, lo, hi = bootstrap_ci(big, n_resamples=300, seed=2)
    assert lo < m < hi and hi - lo < 0.1

    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci(sample, alpha=0)


# --------------------------------------------------------------------------- evaluate modules
def test_registry():
    assert set(METRICS) == {"exact_match", "answer_in_prediction", "token_f1", "recall_at_k"}
    for name, folder in METRICS.items():
        assert (folder / f"{name}.py").is_file()
        assert metric_path(name) == folder
    with pytest.raises(ValueError, match="answer_in_prediction, exact_match, recall_at_k, token_f1"):
        load_metric("bleu")


PREDS = ["The Cat!", "the big red dog", "Paris France", "", "1564", "dog dog", "Jean-Paul Sartre"]
REFS = [["cat"], ["red dog barks"], ["Paris", "France"], ["cat"], ["1564", "AD 1564"], ["dog"], ["Sartre"]]


@pytest.fixture(scope="module")
def loaded():
    pytest.importorskip("evaluate")
    return {name: load_metric(name) for name in METRICS}


def test_evaluate_exact_match_matches(loaded):
    out = loaded["exact_match"].compute(predictions=PREDS, references=REFS)
    expected = [exact_match_score(p, r) for p, r in zip(PREDS, REFS)]
    assert expected == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert out["scores"] == expected
    assert out["exact_match"] == pytest.approx(2 / 7)


def test_evaluate_answer_in_prediction_matches(loaded):
    out = loaded["answer_in_prediction"].compute(predictions=PREDS, references=REFS)
    expected = [answer_in_prediction_score(p, r) for p, r in zip(PREDS, REFS)]
    # "the big red dog" lacks "red dog barks"; "Paris France" contains "Paris"; "dog dog" contains "dog";
    # "jeanpaul sartre" contains "sartre"
    assert expected == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert out["scores"] == expected
    assert out["answer_in_prediction"] == pytest.approx(5 / 7)
    # the module's own copy of the normalisation and matching agrees on the tricky cases too
    preds = ["It was discovered in 1807.", "Its atomic number is 17.", "The chemical symbol of palladium is Pd.",
             "", "", "New jersey, not York", "It is an Eiffel Tower."]
    refs = [["7"], ["7", "17"], ["Pd"], ["the"], ["Pd"], ["New York"], ["the Eiffel tower!"]]
    out = loaded["answer_in_prediction"].compute(predictions=preds, references=refs)
    assert out["scores"] == [answer_in_prediction_score(p, r) for p, r in zip(preds, refs)]
    assert out["scores"] == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        loaded["answer_in_prediction"].compute(predictions=["x"], references=[[]])


def test_evaluate_token_f1_matches(loaded):
    out = loaded["token_f1"].compute(predictions=PREDS, references=REFS)
    expected = [token_f1_score(p, r) for p, r in zip(PREDS, REFS)]
    assert expected == pytest.approx([1.0, 2 / 3, 2 / 3, 0.0, 1.0, 2 / 3, 2 / 3])
    assert out["scores"] == pytest.approx(expected)
    assert out["token_f1"] == pytest.approx(sum(expected) / len(expected))


def test_evaluate_recall_at_k_matches(loaded):
    retrieved = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    gold = ["b", "f", "x"]
    for k in (1, 2, 3):
        out = loaded["recall_at_k"].compute(predictions=retrieved, references=gold, k=k)
        assert out["recall_at_k"] == pytest.approx(recall_at_k(retrieved, gold, k))
    assert loaded["recall_at_k"].compute(predictions=retrieved, references=gold, k=2)["scores"] == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        loaded["recall_at_k"].compute(predictions=retrieved, references=gold, k=0)


def test_evaluate_load_by_path():
    evaluate = pytest.importorskip("evaluate")
    m = evaluate.load(str(METRICS["exact_match"]), keep_in_memory=True)
    assert m.compute(predictions=["The  Cat!"], references=[["cat"]]) == {"exact_match": 1.0, "scores": [1.0]}
