"""How passages are found: dense (FAISS over encoder embeddings), BM25, and hybrid (RRF of both).

One implementation, used by every unit that stores passages (chunks, and through their
``ChunkDatastore`` the tags and latent units):

* ``dense``  — s(q, i) = e(q)·e(i) (unit embeddings: cosine) or, with ``metric=l2``, minus the
  squared distance; FAISS index by :class:`~rcd.datastore.index.IndexSpec`;
* ``bm25``   — bm25s (lucene variant): s(q, i) = Σ_{t ∈ q} idf_t · tf_{t,i} /
  (tf_{t,i} + k1·(1 - b + b·|i|/avg|i|)), idf_t = ln(1 + (N - df_t + 0.5)/(df_t + 0.5)),
  k1 = 1.5, b = 0.75, over lower-cased ``\\w\\w+`` tokens with English stop words removed (no
  stemming); entries with score 0 are not hits;
* ``hybrid`` — reciprocal rank fusion of both lists (top ``candidates`` of each):
  RRF(i) = Σ_{r ∈ {dense, bm25}} 1 / (rrf_k + rank_r(i)), ranks from 1; ties by entry id.

Every search returns numpy ids [N, k] (-1 = no hit) and scores [N, k] (higher = better, -inf for
no hit).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from rcd.datastore.base import Timer
from rcd.datastore.storage import DatastoreError, Strings

RETRIEVERS = ("dense", "bm25", "hybrid")
BM25_STOPWORDS = "en"


def check_retriever(retriever: str) -> None:
    if retriever not in RETRIEVERS:
        raise ValueError(f"retriever={retriever!r}: choose one of {', '.join(RETRIEVERS)}")


# --------------------------------------------------------------------------- BM25 files
def bm25_tokenize(texts: Sequence[str]):
    import bm25s

    return bm25s.tokenize(list(texts), stopwords=BM25_STOPWORDS, return_ids=False, show_progress=False)


def build_bm25(tmp: Path, texts: Strings, progress: bool) -> dict:
    """Index every entry text with BM25 into ``tmp/bm25``; returns its manifest entry."""
    import bm25s

    timer = Timer()
    tokens = bm25s.tokenize([texts[i] for i in range(len(texts))], stopwords=BM25_STOPWORDS,
                            show_progress=progress)
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=progress)
    retriever.save(str(tmp / "bm25"), show_progress=False)
    return {"folder": "bm25", "stopwords": BM25_STOPWORDS, "method": "lucene", "k1": 1.5, "b": 0.75,
            "seconds": round(timer.seconds, 2)}


def load_bm25(folder: Path, spec: dict):
    """Open the BM25 index written by :func:`build_bm25` (memory-mapped)."""
    import bm25s

    path = Path(folder) / spec["folder"]
    if not path.is_dir():
        raise DatastoreError(f"{path} is missing: the datastore is incomplete; delete {folder} and rebuild")
    try:
        return bm25s.BM25.load(str(path), mmap=True, show_progress=False, verbosity=0)
    except Exception as e:  # bm25s raises several types on corrupt files
        raise DatastoreError(f"{path} is corrupt ({e}); delete {folder} and rebuild") from e


# --------------------------------------------------------------------------- fusion
def rrf_fuse(lists: Sequence[np.ndarray], k: int, rrf_k: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal rank fusion of ranked id lists ([N, C] each, -1 = none): top-k ids and RRF scores."""
    N = lists[0].shape[0]
    ids = np.full((N, k), -1, dtype=np.int64)
    scores = np.full((N, k), -np.inf, dtype=np.float32)
    for q in range(N):
        acc: dict[int, float] = {}
        for lst in lists:
            for rank, i in enumerate(lst[q], start=1):
                if i >= 0:
                    acc[int(i)] = acc.get(int(i), 0.0) + 1.0 / (rrf_k + rank)
        best = sorted(acc.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        for j, (i, s) in enumerate(best):
            ids[q, j], scores[q, j] = i, s
    return ids, scores


def _pad(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if ids.shape[1] < k:
        n = ids.shape[0]
        ids = np.concatenate([ids, np.full((n, k - ids.shape[1]), -1, ids.dtype)], 1)
        scores = np.concatenate([scores, np.full((n, k - scores.shape[1]), -np.inf, scores.dtype)], 1)
    return ids, scores


# --------------------------------------------------------------------------- search
class Retriever:
    """Search over ``size`` entries by ``method`` (dense | bm25 | hybrid); see the module docstring."""

    def __init__(self, method: str, size: int, *, encoder=None, index=None, metric: str = "ip", bm25=None,
                 rrf_k: int = 60, candidates: int = 100):
        check_retriever(method)
        self.method = method
        self.size = int(size)
        self.encoder = encoder
        self.index = index
        self.metric = metric
        self.bm25 = bm25
        self.rrf_k = int(rrf_k)
        self.candidates = int(candidates)

    def dense(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest entries of query embeddings q [N, d]."""
        D, I = self.index.search(np.ascontiguousarray(q, dtype=np.float32), min(k, self.size))
        D = np.asarray(D, dtype=np.float32)
        I = np.asarray(I, dtype=np.int64)
        if self.metric == "l2":
            D = -D
        D = np.where(I < 0, -np.inf, D).astype(np.float32)
        return _pad(I, D, k)

    def lexical(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """BM25 hits of the query strings (entries with no matching term are not hits)."""
        res, sc = self.bm25.retrieve(bm25_tokenize(queries), k=min(k, self.size), show_progress=False)
        I = np.asarray(res, dtype=np.int64)
        D = np.asarray(sc, dtype=np.float32)
        miss = D <= 0
        I = np.where(miss, -1, I)
        D = np.where(miss, -np.inf, D).astype(np.float32)
        # entries with no matching term come last: keep hits first, in score order
        order = np.argsort(-D, axis=1, kind="stable")
        return _pad(np.take_along_axis(I, order, 1), np.take_along_axis(D, order, 1), k)

    def embed(self, queries: Sequence[str]) -> np.ndarray:
        if self.encoder is None:
            raise ValueError(f"retriever={self.method!r} has no encoder")
        return self.encoder.encode_tensor(list(queries)).numpy()

    def search_ids(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.method == "dense":
            return self.dense(self.embed(queries), k)
        if self.method == "bm25":
            return self.lexical(queries, k)
        c = max(k, self.candidates)
        dense_ids, _ = self.dense(self.embed(queries), c)
        bm25_ids, _ = self.lexical(queries, c)
        return rrf_fuse([dense_ids, bm25_ids], k, self.rrf_k)

    def describe(self) -> Optional[str]:
        parts = ([type(self.index).__name__] if self.index is not None else []) + \
                (["BM25(bm25s)"] if self.bm25 is not None else [])
        return " + ".join(parts)
