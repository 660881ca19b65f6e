"""Quality metrics for rcd: answer matching, retrieval recall, diversity, confidence intervals.

Two layers:

* pure functions (numpy / stdlib only, cheap to import): :func:`normalize_answer`,
  :func:`exact_match_score`, :func:`answer_in_prediction_score`, :func:`token_f1_score`,
  :func:`recall_at_k`, :func:`distinct_n`, :func:`bootstrap_ci`;
* Hugging Face ``evaluate`` modules kept inside the package (``rcd/metrics/<name>/<name>.py``),
  loaded offline by path through :func:`load_metric` (``METRICS`` lists them).

All scores are on a 0-1 scale (not x100).  The evaluate modules return the mean under the
metric's own name and the per-example values under ``"scores"``::

    load_metric("exact_match").compute(predictions=[...], references=[[...], ...])
        -> {"exact_match": float, "scores": [float, ...]}
    load_metric("answer_in_prediction").compute(predictions=[...], references=[[...], ...])
        -> {"answer_in_prediction": float, "scores": [float, ...]}
    load_metric("token_f1").compute(predictions=[...], references=[[...], ...])
        -> {"token_f1": float, "scores": [float, ...]}
    load_metric("recall_at_k").compute(predictions=[[ids...], ...], references=[gold, ...], k=5)
        -> {"recall_at_k": float, "scores": [float, ...]}

The evaluate module files carry their own copy of the SQuAD normalisation (``evaluate`` copies
a module file alone into its cache, so it cannot import rcd); tests check the copies agree.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

_HERE = Path(__file__).resolve().parent

#: name -> folder of the evaluate module (``evaluate.load`` accepts the folder path)
METRICS: dict[str, Path] = {
    "exact_match": _HERE / "exact_match",
    "answer_in_prediction": _HERE / "answer_in_prediction",
    "token_f1": _HERE / "token_f1",
    "recall_at_k": _HERE / "recall_at_k",
}

__all__ = [
    "METRICS",
    "metric_path",
    "load_metric",
    "normalize_answer",
    "exact_match_score",
    "answer_in_prediction_score",
    "token_f1_score",
    "recall_at_k",
    "distinct_n",
    "bootstrap_ci",
]


def metric_path(name: str) -> Path:
    """Folder of the evaluate module called ``name``; ValueError listing the names if unknown."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(sorted(METRICS))}") from None


def load_metric(name: str, **kwargs):
    """Load the evaluate module ``name`` from this package by path (no hub, works offline).

    ``kwargs`` go to ``evaluate.load``; ``keep_in_memory`` defaults to True so that concurrent
    runs do not share on-disk arrow caches.
    """
    path = metric_path(name)
    import evaluate  # heavy import, only when an evaluate module is wanted

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(path), **kwargs)


# --------------------------------------------------------------------------- answers
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop ASCII punctuation, drop the articles a/an/the,
    collapse whitespace.  ``"The  Cat!"`` -> ``"cat"``."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _check_refs(references: Sequence[str]) -> None:
    if isinstance(references, str):
        raise TypeError("references must be a list of strings, not a string")
    if len(references) == 0:
        raise ValueError("need at least one reference")


def exact_match_score(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    _check_refs(references)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


def _contains_tokens(pred: list[str], ref: list[str]) -> bool:
    """``ref`` occurs in ``pred`` as a contiguous run of whole tokens; an empty ``ref`` only in an
    empty ``pred`` (so containment is never below exact match, and never trivially true)."""
    if not ref:
        return not pred
    n = len(ref)
    return any(pred[i : i + n] == ref for i in range(len(pred) - n + 1))


def answer_in_prediction_score(prediction: str, references: Sequence[str]) -> float:
    """Answer containment ("has_answer" / accuracy in DPR, PopQA, Self-RAG): 1.0 if any normalised
    reference occurs in the normalised prediction as a whole-word sequence, else 0.0.

    Token boundaries count: ``"7"`` is not in ``"17"`` or ``"1807"``; ``"Pd"`` is in
    ``"The chemical symbol of palladium is Pd."``.  Words are split at
    punctuation (``"(1858-1913)"`` contains ``"1858"``), otherwise SQuAD normalisation (lowercase,
    no articles); the score is max(exact match, containment), so it is never below exact match.
    """
    _check_refs(references)
    if exact_match_score(prediction, references):
        return 1.0
    pred = _words(prediction)
    return float(any(_contains_tokens(pred, _words(r)) for r in references))


def _words(s: str) -> list[str]:
    """Lowercased words split at whitespace and punctuation, articles dropped (for containment)."""
    s = "".join(" " if ch in _PUNCT else ch for ch in s.lower())
    return _ARTICLES.sub(" ", s).split()


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1_score(prediction: str, references: Sequence[str]) -> float:
    """Best bag-of-tokens F1 (0-1) of the normalised prediction over the references.
    Two empty answers score 1, one empty answer scores 0."""
    _check_refs(references)
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(r).split()) for r in references)


# --------------------------------------------------------------------------- retrieval
def recall_at_k(retrieved_ids: Sequence[Sequence[str]], gold_ids: Sequence, k: int) -> float:
    """Share of queries whose gold id is among their first ``k`` retrieved ids (0-1).

    ``gold_ids[i]`` is one id, or a collection of ids (a hit on any counts).  Raises ValueError
    for mismatched lengths, no queries, or ``k < 1``.
    """
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if len(retrieved_ids) != len(gold_ids):
        raise ValueError(f"{len(retrieved_ids)} retrieval lists but {len(gold_ids)} gold ids")
    if len(gold_ids) == 0:
        raise ValueError("no queries")
    hits = 0
    for ids, gold in zip(retrieved_ids, gold_ids):
        top = set(list(ids)[:k])
        golds = {gold} if isinstance(gold, str) else set(gold)
        hits += bool(top & golds)
    return hits / len(gold_ids)


# --------------------------------------------------------------------------- diversity
def distinct_n(texts: Iterable[str], n: int) -> float:
    """Corpus-level distinct-n (Li et al., 2016): unique n-grams / all n-grams, over tokens split
    on whitespace, n-grams taken within each text (never across texts).  0.0 when there are no
    n-grams (e.g. every text shorter than n tokens)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if isinstance(texts, str):
        texts = [texts]
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        toks = text.split()
        for i in range(len(toks) - n + 1):
            seen.add(tuple(toks[i : i + n]))
            total += 1
    return len(seen) / total if total else 0.0


# --------------------------------------------------------------------------- uncertainty
def bootstrap_ci(
    values: Sequence[float], n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """Percentile bootstrap of the mean: ``(mean, low, high)`` with a ``1 - alpha`` interval.

    ``mean`` is the sample mean itself; the bounds are the ``alpha/2`` and ``1 - alpha/2``
    quantiles of ``n_resamples`` resampled means (numpy ``default_rng(seed)``, so the same
    inputs and seed give the same interval).  Resampling is done in fixed-size chunks so memory
    stays bounded for large samples.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    mean = float(x.mean())
    rng = np.random.default_rng(seed)
    n = x.size
    rows = max(1, min(n_resamples, 4_000_000 // n))  # ~32 MB of indices per chunk at most
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, rows):
        stop = min(start + rows, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = x[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return mean, float(low), float(high)
