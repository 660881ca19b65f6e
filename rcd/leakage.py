"""Held-out / datastore leakage by n-gram overlap on normalised text.

Both sides are normalised the same way: lower-cased, split into word tokens (runs of letters and
digits; punctuation, line breaks and other white space are dropped), so re-flowed, re-indented or
re-punctuated copies of a passage still match. A held-out n-gram (``n`` = 13 by default, as in
the contamination checks of GPT-3 and later LM papers) *leaks* when the same n words occur anywhere
in the datastore corpus. The overlap rate is

    overlap = |{held-out n-gram positions whose n-gram occurs in the datastore}| / |held-out n-gram positions|

computed with 64-bit polynomial hashes of the word-id windows (numpy; a 1.5M-word corpus takes
about a second). :func:`check_disjoint` refuses a run whose overlap exceeds ``max_overlap``, naming
the held-out and datastore documents that share the most n-grams.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rcd.corpus import CorpusError

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_P = np.uint64(1_000_003)


class LeakError(CorpusError):
    """The held-out text overlaps the datastore corpus."""


def words(text: str) -> list[str]:
    """Normalised word tokens of ``text`` (lower case, letters and digits only)."""
    return _WORD.findall(text.lower())


def ngram_hashes(tokens: list[str], n: int, vocab: dict[str, int]) -> np.ndarray:
    """uint64 hashes of every window of ``n`` consecutive tokens (empty when fewer than ``n``)."""
    if len(tokens) < n:
        return np.zeros(0, dtype=np.uint64)
    ids = np.fromiter((vocab.setdefault(t, len(vocab) + 1) for t in tokens), dtype=np.uint64, count=len(tokens))
    m = len(ids) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _P + ids[j:j + m]
    return h


@dataclass
class Overlap:
    ngram: int
    heldout_ngrams: int
    shared: int
    documents: list[dict[str, Any]] = field(default_factory=list)  # held-out docs with shared n-grams, worst first

    @property
    def rate(self) -> float:
        return self.shared / self.heldout_ngrams if self.heldout_ngrams else 0.0

    def summary(self) -> dict[str, Any]:
        return {"ngram": self.ngram, "heldout_ngrams": self.heldout_ngrams, "shared_ngrams": self.shared,
                "overlap": self.rate, "documents": self.documents[:10]}


def _ids(ds) -> list[str]:
    return [str(x) for x in ds["id"]] if "id" in ds.column_names else [str(i) for i in range(len(ds))]


def ngram_overlap(datastore_ds, heldout_ds, n: int = 13) -> Overlap:
    """Overlap of ``heldout_ds``'s n-grams with ``datastore_ds``'s (``text`` columns; see module doc)."""
    if n < 1:
        raise LeakError(f"leak_check.ngram={n} must be >= 1")
    vocab: dict[str, int] = {}
    held = [ngram_hashes(words(t or ""), n, vocab) for t in heldout_ds["text"]]
    store_parts, store_doc = [], []
    for d, t in enumerate(datastore_ds["text"]):
        h = ngram_hashes(words(t or ""), n, vocab)
        store_parts.append(h)
        store_doc.append(np.full(len(h), d, dtype=np.int64))
    store = np.concatenate(store_parts) if store_parts else np.zeros(0, dtype=np.uint64)
    doc_of = np.concatenate(store_doc) if store_doc else np.zeros(0, dtype=np.int64)
    order = np.argsort(store, kind="stable")
    store, doc_of = store[order], doc_of[order]
    held_ids, store_ids = _ids(heldout_ds), _ids(datastore_ds)
    total = shared = 0
    docs = []
    for i, h in enumerate(held):
        total += len(h)
        if not len(h) or not len(store):
            continue
        pos = np.searchsorted(store, h)
        hit = (pos < len(store)) & (store[np.minimum(pos, len(store) - 1)] == h)
        k = int(hit.sum())
        shared += k
        if k:
            src = doc_of[np.minimum(pos[hit], len(store) - 1)]
            d, c = np.unique(src, return_counts=True)
            top = np.argsort(-c)[:5]
            docs.append({"heldout": held_ids[i], "shared_ngrams": k, "overlap": k / len(h),
                         "datastore_documents": [{"id": store_ids[int(d[j])], "shared_ngrams": int(c[j])}
                                                 for j in top]})
    docs.sort(key=lambda r: -r["shared_ngrams"])
    return Overlap(ngram=n, heldout_ngrams=total, shared=shared, documents=docs)


def check_disjoint(datastore_ds, heldout_ds, *, ngram: int = 13, max_overlap: float = 0.05) -> dict[str, Any]:
    """Refuse a held-out set sharing more than ``max_overlap`` of its n-grams with the datastore.

    Returns :meth:`Overlap.summary` (recorded in results.json as ``leak_check``).
    """
    if not 0.0 <= float(max_overlap) <= 1.0:
        raise LeakError(f"leak_check.max_overlap={max_overlap} must be between 0 and 1")
    ov = ngram_overlap(datastore_ds, heldout_ds, int(ngram))
    if ov.rate > float(max_overlap):
        worst = "; ".join(
            f"held-out {r['heldout']!r} ({r['overlap']:.1%} of its {ngram}-grams) with "
            + ", ".join(f"{s['id']!r}" for s in r["datastore_documents"][:3]) for r in ov.documents[:3])
        raise LeakError(
            f"the held-out text overlaps the datastore corpus: {ov.rate:.1%} of its {ngram}-grams (normalised "
            f"words) occur in the datastore (limit leak_check.max_overlap={max_overlap}). Worst: {worst}. "
            "Exclude these documents from the datastore corpus (e.g. corpus.heldout_works) or choose another "
            "held-out split.")
    return ov.summary()
