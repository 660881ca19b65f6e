"""Chunk datastore (the "what = chunks" unit, as in RAG / In-Context RALM / REPLUG).

Entry i is a passage: ``text(i)``, cut from corpus row ``row(i)`` (id ``doc_id(i)``) by
:mod:`rcd.datastore.chunking` (``tokens`` | ``sentence`` | ``record``). It is found by

* ``dense``  — cosine similarity s(q, i) = e(q)·e(i) of unit embeddings from a sentence
  encoder (:mod:`rcd.datastore.encoders`; default the bundled MiniLM), FAISS by ``index_factory``;
* ``bm25``   — BM25 (bm25s, lucene variant): s(q, i) = Σ_{t ∈ q} idf_t · tf_{t,i} /
  (tf_{t,i} + k1·(1 - b + b·|i|/avg|i|)), idf_t = ln(1 + (N - df_t + 0.5)/(df_t + 0.5)),
  k1 = 1.5, b = 0.75, over lower-cased ``\\w\\w+`` tokens with English stop words removed (no
  stemming); entries with score 0 are not hits;
* ``hybrid`` — reciprocal rank fusion of both lists (top ``candidates`` of each):
  RRF(i) = Σ_{r ∈ {dense, bm25}} 1 / (rrf_k + rank_r(i)), ranks from 1; ties by entry id.

``search(queries, k)`` is batched and returns :class:`ChunkHits` ([N, k] ids / scores on the
model's device, higher score = better; id -1 = no hit, score -inf, text ""). With ``metric=l2``
the dense score is minus the squared distance.

On disk (see :mod:`rcd.datastore.base` for the folder, manifest and atomic build)::

    texts.bin + text_offsets.npy         UTF-8 passages, entry i = bytes[off[i]:off[i+1]]
    chunk_rows.npy [n]  chunk_spans.npy [n, 2]   corpus row and character span of each entry
    doc_ids.bin + doc_id_offsets.npy     id of each corpus row in [row_start, row_end)
    embeddings.npy [n, d]                dense / hybrid (float32, or float16 with key_dtype)
    bm25/                                bm25 / hybrid (bm25s files)
    index/<factory>-<metric>.faiss       built on first load

The fingerprint covers the corpus, chunking (and the LM tokenizer for token chunking), the
encoder (name and a hash of its weights), the retriever and the shard. Loading refuses another
encoder with a clear message (queries and entries would be embedded in different spaces). The
chunk texts themselves do not depend on the LM, so any LM may read them.

Sharding: ``shard=i, num_shards=n`` builds entries for the contiguous row range
``[i·R/n, (i+1)·R/n)`` of the R corpus rows into their own folder; :func:`merge_shards`
concatenates the n shard folders (in order) into the folder an unsharded build would have
(same fingerprint), rebuilding BM25 statistics over all entries, so search after a merge returns
the same neighbours as an unsharded build.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from rcd.datastore import base
from rcd.datastore.base import NpyAppender
from rcd.datastore.chunking import Chunk, Chunker
from rcd.datastore.index import load_or_build_index
from rcd.datastore.shards import check_shard, shard_label, shard_rows

log = logging.getLogger(__name__)

RETRIEVERS = ("dense", "bm25", "hybrid")
BM25_STOPWORDS = "en"
ROW_BLOCK = 256  # corpus rows chunked per step


# --------------------------------------------------------------------------- on-disk helpers
class StringsWriter:
    """Appends strings to ``<name>.bin`` (UTF-8) with offsets in ``<name>_offsets.npy`` [count+1]."""

    def __init__(self, folder: Path, name: str):
        self.name = name
        self.bin = open(Path(folder) / f"{name}.bin", "wb")
        self.offsets = NpyAppender(Path(folder) / f"{name}_offsets.npy", np.int64)
        self.offsets.append([0])
        self.pos = 0

    def add(self, strings: Sequence[str]) -> None:
        if not strings:
            return
        enc = [s.encode("utf-8", "replace") for s in strings]
        self.bin.write(b"".join(enc))
        ends = self.pos + np.cumsum([len(b) for b in enc], dtype=np.int64)
        self.offsets.append(ends)
        self.pos = int(ends[-1])

    def close(self) -> dict:
        self.bin.close()
        spec = self.offsets.close()
        return {"bin": f"{self.name}.bin", "offsets": spec, "count": spec["shape"][0] - 1, "bytes": self.pos}


class Strings:
    """Random access to strings written by :class:`StringsWriter` (memory-mapped)."""

    def __init__(self, folder: Path, spec: dict):
        folder = Path(folder)
        self.offsets = base.open_array(folder, spec["offsets"])
        path = folder / spec["bin"]
        if not path.exists():
            raise base.DatastoreError(f"{path} is missing: the datastore is incomplete; delete {folder} and rebuild")
        if path.stat().st_size != spec["bytes"]:
            raise base.DatastoreError(f"{path} has {path.stat().st_size} bytes, manifest says {spec['bytes']}: "
                                      f"corrupt datastore; delete {folder} and rebuild")
        self.buf = np.memmap(path, dtype=np.uint8, mode="r") if spec["bytes"] > 0 else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"string {i} out of range 0..{len(self) - 1}")
        return bytes(self.buf[int(self.offsets[i]):int(self.offsets[i + 1])]).decode("utf-8", "replace")

    def block(self, start: int, stop: int) -> list[str]:
        return [self[i] for i in range(start, stop)]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def write_entries(tmp: Path, chunker: Chunker, corpus_ds, rows: range, *, max_chunks: Optional[int] = None,
                  progress: bool = True, on_chunks: Optional[Callable[[list[Chunk]], None]] = None) -> dict:
    """Chunk ``corpus_ds`` rows ``rows`` and stream texts/rows/spans/doc ids into ``tmp``.

    ``on_chunks`` sees every block of chunks (the latent datastore stores their token ids).
    Returns the manifest entries for the files written.
    """
    texts = StringsWriter(tmp, "texts")
    doc_ids = StringsWriter(tmp, "doc_ids")
    crow = NpyAppender(tmp / "chunk_rows.npy", np.int64)
    cspan = NpyAppender(tmp / "chunk_spans.npy", np.int64, (2,))
    has_id = "id" in corpus_ds.column_names
    n = 0
    it = range(rows.start, rows.stop, ROW_BLOCK)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"chunking ({chunker.chunking})", unit="block", total=-(-len(rows) // ROW_BLOCK))
    for a in it:
        b = min(a + ROW_BLOCK, rows.stop)
        batch = corpus_ds[a:b]
        doc_ids.add([str(x) for x in batch["id"]] if has_id else [str(r) for r in range(a, b)])
        chunks = chunker.chunks(batch["text"], first_row=a)
        if max_chunks is not None and n + len(chunks) > max_chunks:
            chunks = chunks[:max_chunks - n]
        if chunks:
            texts.add([c.text for c in chunks])
            crow.append([c.row for c in chunks])
            cspan.append([(c.start, c.end) for c in chunks])
            if on_chunks is not None:
                on_chunks(chunks)
            n += len(chunks)
        if max_chunks is not None and n >= max_chunks:
            break
    if progress and hasattr(it, "close"):
        it.close()
    return {"size": n, "rows": [rows.start, rows.stop], "texts": texts.close(), "doc_ids": doc_ids.close(),
            "chunk_rows": crow.close(), "chunk_spans": cspan.close()}


def encode_entries(tmp: Path, texts: Strings, encoder, *, batch_size: int, key_dtype: str, progress: bool) -> dict:
    """Embed every entry text in blocks, appending to ``embeddings.npy`` (sequential writes, bounded RAM)."""
    n = len(texts)
    emb = NpyAppender(tmp / "embeddings.npy", key_dtype, (encoder.dim,))
    block = max(1, batch_size) * 16
    it = range(0, n, block)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"encoding ({encoder.name})", unit="block", total=-(-n // block))
    for s in it:
        e = min(s + block, n)
        emb.append(encoder.encode(texts.block(s, e), batch_size=batch_size))
    return emb.close()


def bm25_tokenize(texts: Sequence[str]):
    import bm25s

    return bm25s.tokenize(list(texts), stopwords=BM25_STOPWORDS, return_ids=False, show_progress=False)


def build_bm25(tmp: Path, texts: Strings, progress: bool) -> dict:
    import bm25s

    timer = base.Timer()
    tokens = bm25s.tokenize([texts[i] for i in range(len(texts))], stopwords=BM25_STOPWORDS,
                            show_progress=progress)
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=progress)
    retriever.save(str(tmp / "bm25"), show_progress=False)
    return {"folder": "bm25", "stopwords": BM25_STOPWORDS, "method": "lucene", "k1": 1.5, "b": 0.75,
            "seconds": round(timer.seconds, 2)}


# --------------------------------------------------------------------------- hits
@dataclass
class ChunkHits:
    """k best entries for N queries: ids [N, k] (-1 = no hit), scores [N, k] (higher = better),
    texts [N][k] and doc_ids [N][k] (corpus row id of each passage; "" for no hit)."""

    ids: torch.LongTensor
    scores: torch.FloatTensor
    texts: list[list[str]]
    doc_ids: list[list[str]]


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


# --------------------------------------------------------------------------- datastore
class ChunkDatastore:
    """Passages with dense (cosine), BM25 or hybrid (RRF) search; see the module docstring."""

    unit = "chunks"

    def __init__(self, folder: Path, manifest: dict, *, retriever: str, encoder=None, index=None, bm25=None,
                 metric: str = "ip", rrf_k: int = 60, candidates: int = 100, device=None):
        self.folder = Path(folder)
        self.manifest = manifest
        self.retriever = retriever
        self.encoder = encoder
        self.index = index
        self.bm25 = bm25
        self.metric = metric
        self.rrf_k = int(rrf_k)
        self.candidates = int(candidates)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.texts = Strings(self.folder, manifest["texts"])
        self.doc_id_strings = Strings(self.folder, manifest["doc_ids"])
        self.rows = base.open_array(self.folder, manifest["chunk_rows"])
        self.spans = base.open_array(self.folder, manifest["chunk_spans"])
        self.row_start = int(manifest["rows"][0])
        self.embeddings = (base.open_array(self.folder, manifest["embeddings"])
                           if manifest.get("embeddings") else None)
        if len(self.texts) != len(self) or self.rows.shape[0] != len(self):
            raise base.DatastoreError(f"{self.folder}: entry files disagree on the number of entries; "
                                      f"delete {self.folder} and rebuild")

    def __len__(self) -> int:
        return int(self.manifest["size"])

    # ---------------------------------------------------------------- payloads
    def text(self, i: int) -> str:
        return self.texts[i]

    def doc_id(self, i: int) -> str:
        return self.doc_id_strings[int(self.rows[int(i)]) - self.row_start]

    def row(self, i: int) -> int:
        return int(self.rows[int(i)])

    def span(self, i: int) -> tuple[int, int]:
        s, e = self.spans[int(i)]
        return int(s), int(e)

    # ---------------------------------------------------------------- build
    @staticmethod
    def spec(corpus_name: str, corpus_fp: str, chunker: Chunker, retriever: str, encoder_ident: Optional[dict],
             max_chunks, key_dtype: str, shard) -> dict:
        return {"unit": "chunks", "corpus": corpus_fp, "corpus_name": corpus_name, **chunker.spec(),
                "retriever": retriever,
                "encoder": None if encoder_ident is None else
                {"fingerprint": encoder_ident["fingerprint"], "normalize": encoder_ident["normalize"]},
                "key_dtype": key_dtype if encoder_ident is not None else None, "max_chunks": max_chunks,
                "shard": None if shard is None else list(shard)}

    @classmethod
    def build(cls, corpus_ds, folder: Path, spec: dict, chunker: Chunker, *, retriever: str, encoder=None,
              rows: Optional[range] = None, batch_size: int = 64, key_dtype: str = "float32",
              max_chunks: Optional[int] = None, progress: bool = True, lm=None,
              on_chunks: Optional[Callable[[list[Chunk]], None]] = None) -> Path:
        """Chunk, embed and index ``corpus_ds`` into ``folder`` atomically (``on_chunks`` sees each block)."""
        timer = base.Timer()
        rows = rows if rows is not None else range(len(corpus_ds))
        with base.atomic_folder(folder) as tmp:
            files = write_entries(tmp, chunker, corpus_ds, rows, max_chunks=max_chunks, progress=progress,
                                  on_chunks=on_chunks)
            cls.finish(tmp, folder, spec, files, retriever=retriever, encoder=encoder, batch_size=batch_size,
                       key_dtype=key_dtype, chunker_spec=chunker.spec(), progress=progress, timer=timer, lm=lm)
        log.info("built chunk datastore %s in %.1fs", folder, timer.seconds)
        return folder

    @classmethod
    def finish(cls, tmp: Path, folder: Path, spec: dict, files: dict, *, retriever: str, encoder, batch_size: int,
               key_dtype: str, chunker_spec: dict, progress: bool, timer, lm=None,
               embeddings: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
        """Embed (unless ``embeddings`` were merged in), build BM25, and write the manifest."""
        n = files["size"]
        if n == 0:
            raise ValueError("the corpus gave no chunks (empty or white-space rows only): nothing to put in the datastore")
        texts = Strings(tmp, files["texts"])
        if retriever in ("dense", "hybrid") and embeddings is None:
            embeddings = encode_entries(tmp, texts, encoder, batch_size=batch_size, key_dtype=key_dtype,
                                        progress=progress)
        bm25 = build_bm25(tmp, texts, progress) if retriever in ("bm25", "hybrid") else None
        manifest = {
            "format": base.FORMAT, "unit": "chunks", "fingerprint": base.fingerprint(spec), "spec": spec,
            **files, "chunking": chunker_spec, "retriever": retriever,
            "encoder": encoder.identity() if retriever != "bm25" else None,
            "embeddings": embeddings if retriever != "bm25" else None, "bm25": bm25,
            "chunking_model": None if lm is None or chunker_spec["chunking"] != "tokens" else lm.name,
            "build_seconds": round(timer.seconds, 2), "entries_per_second": round(n / max(timer.seconds, 1e-9), 1),
            **(extra or {}),
        }
        base.write_manifest(tmp, manifest)
        return manifest

    # ---------------------------------------------------------------- load
    @classmethod
    def load(cls, folder: Path, lm=None, *, encoder=None, retriever: Optional[str] = None, index_factory: str = "Flat",
             metric: str = "ip", nprobe: int = 32, ef_search: int = 128, use_gpu: Optional[bool] = None,
             rrf_k: int = 60, candidates: int = 100, device=None, progress: bool = False) -> "ChunkDatastore":
        """Open a chunk datastore; ``retriever`` may pick a part of a hybrid one (dense or bm25)."""
        folder = Path(folder)
        manifest = base.read_manifest(folder)
        if manifest.get("unit") != "chunks":
            raise base.DatastoreError(f"{folder} holds a {manifest.get('unit')!r} datastore, not chunks")
        built = manifest["retriever"]
        retriever = retriever or built
        if retriever not in RETRIEVERS:
            raise ValueError(f"retriever={retriever!r}: choose one of {', '.join(RETRIEVERS)}")
        if built != "hybrid" and retriever != built:
            raise base.DatastoreError(f"{folder} was built for retriever={built!r} and cannot serve {retriever!r}; "
                                      f"build it with datastore.retriever={retriever}")
        enc = index = bm25 = None
        if retriever in ("dense", "hybrid"):
            rec = manifest["encoder"]
            enc = check_encoder(rec, encoder, folder,
                                device=device or (lm.device if lm is not None else None))
            emb = base.open_array(folder, manifest["embeddings"])
            index = load_or_build_index(folder, emb, index_factory, metric, nprobe=nprobe, ef_search=ef_search,
                                        use_gpu=use_gpu, progress=progress)
        if retriever in ("bm25", "hybrid"):
            import bm25s

            path = folder / manifest["bm25"]["folder"]
            if not path.is_dir():
                raise base.DatastoreError(f"{path} is missing: the datastore is incomplete; delete {folder} and rebuild")
            try:
                bm25 = bm25s.BM25.load(str(path), mmap=True, show_progress=False, verbosity=0)
            except Exception as e:  # bm25s raises several types on corrupt files
                raise base.DatastoreError(f"{path} is corrupt ({e}); delete {folder} and rebuild") from e
        dev = device if device is not None else (lm.device if lm is not None else "cpu")
        return cls(folder, manifest, retriever=retriever, encoder=enc, index=index, bm25=bm25, metric=metric,
                   rrf_k=rrf_k, candidates=candidates, device=dev)

    # ---------------------------------------------------------------- search
    def encode(self, queries: Sequence[str]) -> torch.Tensor:
        """Query embeddings [N, d] (float32, CPU) in the space of the entries."""
        if self.encoder is None:
            raise ValueError(f"{self.folder} is searched with retriever={self.retriever!r}: it has no encoder")
        return self.encoder.encode_tensor(list(queries))

    def _dense(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        kk = min(k, len(self))
        D, I = self.index.search(np.ascontiguousarray(q, dtype=np.float32), kk)
        D = np.asarray(D, dtype=np.float32)
        I = np.asarray(I, dtype=np.int64)
        if self.metric == "l2":
            D = -D
        D = np.where(I < 0, -np.inf, D).astype(np.float32)
        return _pad(I, D, k)

    def _bm25(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        kk = min(k, len(self))
        res, sc = self.bm25.retrieve(bm25_tokenize(queries), k=kk, show_progress=False)
        I = np.asarray(res, dtype=np.int64)
        D = np.asarray(sc, dtype=np.float32)
        miss = D <= 0
        I = np.where(miss, -1, I)
        D = np.where(miss, -np.inf, D).astype(np.float32)
        # entries with no matching term come last: keep hits first, in score order
        order = np.argsort(-D, axis=1, kind="stable")
        return _pad(np.take_along_axis(I, order, 1), np.take_along_axis(D, order, 1), k)

    def _hits(self, ids: np.ndarray, scores: np.ndarray) -> ChunkHits:
        texts = [[self.text(i) if i >= 0 else "" for i in row] for row in ids.tolist()]
        docs = [[self.doc_id(i) if i >= 0 else "" for i in row] for row in ids.tolist()]
        return ChunkHits(ids=torch.from_numpy(ids).to(self.device),
                         scores=torch.from_numpy(scores.astype(np.float32)).to(self.device), texts=texts, doc_ids=docs)

    def search_ids(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search` but ids/scores only, as numpy arrays (no payloads)."""
        if isinstance(queries, str):
            queries = [queries]
        k = int(k)
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        if len(queries) == 0:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        if self.retriever == "dense":
            return self._dense(self.encode(queries).numpy(), k)
        if self.retriever == "bm25":
            return self._bm25(queries, k)
        c = max(k, self.candidates)
        dense_ids, _ = self._dense(self.encode(queries).numpy(), c)
        bm25_ids, _ = self._bm25(queries, c)
        return rrf_fuse([dense_ids, bm25_ids], k, self.rrf_k)

    def search(self, queries: list[str], k: int) -> ChunkHits:
        """k best passages for each query (one batched call)."""
        return self._hits(*self.search_ids(queries, k))

    def search_vectors(self, q: torch.Tensor, k: int) -> ChunkHits:
        """Dense search with query embeddings q [N, d] (normalised here if the encoder normalises)."""
        if self.index is None:
            raise ValueError(f"search_vectors needs dense embeddings; {self.folder} is searched with "
                             f"retriever={self.retriever!r}")
        d = self.manifest["encoder"]["dim"]
        if q.dim() != 2 or q.shape[1] != d:
            raise ValueError(f"query vectors must be [N, {d}], got {tuple(q.shape)}")
        q = q.detach().float().cpu()
        if self.manifest["encoder"].get("normalize"):
            q = torch.nn.functional.normalize(q, dim=-1)
        k = int(k)
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        return self._hits(*self._dense(q.numpy(), k))

    def describe(self) -> dict[str, Any]:
        parts = []
        if self.index is not None:
            parts.append(type(self.index).__name__)
        if self.bm25 is not None:
            parts.append("BM25(bm25s)")
        enc = self.manifest.get("encoder") or {}
        return {"unit": "chunks", "size": len(self), "folder": str(self.folder), "index": " + ".join(parts),
                "bytes": folder_bytes(self.folder), "retriever": self.retriever, "encoder": enc.get("name"),
                "chunking": self.manifest.get("chunking"), "metric": self.metric if self.index is not None else None}


def check_encoder(recorded: dict, encoder, folder: Path, device=None):
    """Load ``encoder`` and refuse it unless its weights fingerprint is the one recorded at build time."""
    from rcd.datastore.encoders import load_encoder

    from rcd.datastore.encoders import ALIASES

    if encoder is None:  # the encoder recorded at build time
        if recorded["name"] in ALIASES:
            encoder = recorded["name"]
        elif Path(recorded["source"]).is_dir() or recorded["source"] != "in-memory":
            encoder = recorded["source"]
        else:
            raise base.DatastoreError(f"datastore {folder} was built with an in-memory encoder; pass the same "
                                      "encoder (encoder=...) to load it")
    enc = load_encoder(encoder, device=device, normalize=recorded.get("normalize", True))
    if enc.fingerprint != recorded["fingerprint"] or enc.dim != recorded["dim"]:
        raise base.DatastoreError(
            f"datastore {folder} was built with encoder {recorded['name']!r} (weights fingerprint "
            f"{recorded['fingerprint']}, dim {recorded['dim']}) and cannot be searched with encoder {enc.name!r} "
            f"(fingerprint {enc.fingerprint}, dim {enc.dim}): queries and passages would be embedded in different "
            f"spaces. Build a datastore for this encoder (same command with datastore.encoder={enc.name}).")
    return enc


def resolve_parts(lm, corpus_ds, corpus_name: str, *, chunking, chunk_size, overlap, retriever, encoder,
                  max_chunks, key_dtype, shard, num_shards, encoder_device=None):
    """Validate the config and compute (chunker, encoder, shard, spec) shared by build, load and merge."""
    from rcd.corpus import fingerprint as corpus_fingerprint

    if retriever not in RETRIEVERS:
        raise ValueError(f"retriever={retriever!r}: choose one of {', '.join(RETRIEVERS)}")
    if key_dtype not in ("float16", "float32"):
        raise ValueError(f"key_dtype={key_dtype!r}: choose float16 or float32")
    if corpus_ds is None or len(corpus_ds) == 0:
        raise ValueError(f"corpus {corpus_name!r} is empty: nothing to build a datastore from")
    sh = check_shard(shard, num_shards)
    if sh is not None and max_chunks is not None:
        raise ValueError("max_chunks cannot be combined with sharding (each shard would be capped separately, "
                         "so the merged datastore would differ from an unsharded build)")
    chunker = Chunker(chunking, chunk_size, overlap, tokenizer=lm.tokenizer if lm is not None else None)
    enc = None
    if retriever in ("dense", "hybrid"):
        from rcd.datastore.encoders import load_encoder

        enc = load_encoder(encoder, device=encoder_device or (lm.device if lm is not None else None))
    spec = ChunkDatastore.spec(corpus_name, corpus_fingerprint(corpus_ds), chunker, retriever,
                               enc.identity() if enc is not None else None, max_chunks, key_dtype, sh)
    return chunker, enc, sh, spec


def _folder_for(root: Path, corpus_name: str, enc, retriever: str, sh, spec: dict) -> tuple[Path, bool]:
    fp = base.fingerprint(spec)
    found = base.find_existing(root, fp)
    if found is not None:
        return found, True
    label = enc.name if enc is not None else "bm25"
    return Path(root) / base.folder_name("chunks", shard_label(corpus_name, sh), label, fp), False


def build_or_load(lm, corpus_ds, corpus_name: str, root: Path, *, chunking: str = "tokens", chunk_size: int = 128,
                  overlap: int = 32, retriever: str = "dense", encoder: Union[str, Any] = "minilm",
                  index_factory: str = "Flat", metric: str = "ip", rrf_k: int = 60, batch_size: int = 64,
                  max_chunks: Optional[int] = None, progress: bool = True, shard: Optional[int] = None,
                  num_shards: Optional[int] = None, key_dtype: str = "float32", nprobe: int = 32,
                  ef_search: int = 128, use_gpu: Optional[bool] = None, candidates: int = 100,
                  encoder_device=None, **unused) -> ChunkDatastore:
    """Reuse the chunk datastore with the same fingerprint under ``root`` or build it."""
    if root is None:
        from rcd.paths import cache_dir

        root = cache_dir("datastores")
    chunker, enc, sh, spec = resolve_parts(lm, corpus_ds, corpus_name, chunking=chunking, chunk_size=chunk_size,
                                           overlap=overlap, retriever=retriever, encoder=encoder,
                                           max_chunks=max_chunks, key_dtype=key_dtype, shard=shard,
                                           num_shards=num_shards, encoder_device=encoder_device)
    folder, exists = _folder_for(root, corpus_name, enc, retriever, sh, spec)
    if not exists:
        ChunkDatastore.build(corpus_ds, folder, spec, chunker, retriever=retriever, encoder=enc,
                             rows=shard_rows(len(corpus_ds), sh), batch_size=batch_size, key_dtype=key_dtype,
                             max_chunks=max_chunks, progress=progress, lm=lm)
    return ChunkDatastore.load(folder, lm, encoder=enc, index_factory=index_factory, metric=metric, nprobe=nprobe,
                               ef_search=ef_search, use_gpu=use_gpu, rrf_k=rrf_k, candidates=candidates,
                               progress=progress)


def merge_shards(lm, corpus_ds, corpus_name: str, root: Path, *, num_shards: int, chunking: str = "tokens",
                 chunk_size: int = 128, overlap: int = 32, retriever: str = "dense", encoder="minilm",
                 index_factory: str = "Flat", metric: str = "ip", rrf_k: int = 60, batch_size: int = 64,
                 max_chunks: Optional[int] = None, progress: bool = True, key_dtype: str = "float32",
                 nprobe: int = 32, ef_search: int = 128, use_gpu: Optional[bool] = None, candidates: int = 100,
                 encoder_device=None, shard=None, **unused) -> ChunkDatastore:
    """Merge the ``num_shards`` shard folders of this config into the unsharded datastore's folder."""
    from rcd.datastore import shards

    if root is None:
        from rcd.paths import cache_dir

        root = cache_dir("datastores")
    common = dict(chunking=chunking, chunk_size=chunk_size, overlap=overlap, retriever=retriever, encoder=encoder,
                  max_chunks=max_chunks, key_dtype=key_dtype, encoder_device=encoder_device)
    chunker, enc, _, spec = resolve_parts(lm, corpus_ds, corpus_name, shard=None, num_shards=None, **common)
    folder, exists = _folder_for(root, corpus_name, enc, retriever, None, spec)
    if not exists:
        parts = []
        for i in range(int(num_shards)):
            _, _, sh, sspec = resolve_parts(lm, corpus_ds, corpus_name, shard=i, num_shards=num_shards, **common)
            parts.append(shards.require_shard(root, sspec, "chunks", i, num_shards))
        merge_chunk_folders(parts, folder, spec, chunker_spec=chunker.spec(), retriever=retriever, encoder=enc,
                            progress=progress, lm=lm)
    return ChunkDatastore.load(folder, lm, encoder=enc, index_factory=index_factory, metric=metric, nprobe=nprobe,
                               ef_search=ef_search, use_gpu=use_gpu, rrf_k=rrf_k, candidates=candidates,
                               progress=progress)


def merge_chunk_folders(parts: list[Path], folder: Path, spec: dict, *, chunker_spec: dict, retriever: str, encoder,
                        progress: bool = True, lm=None) -> Path:
    """Concatenate chunk-datastore shard folders ``parts`` (in order) into ``folder`` atomically.

    Texts, rows, spans, doc ids and embeddings are streamed; BM25 is rebuilt over all entries
    (its statistics are global); the FAISS index is built on first load.
    """
    from rcd.datastore import shards

    timer = base.Timer()
    with base.atomic_folder(folder) as tmp:
        files = shards.merge_entry_files(parts, tmp)
        emb = shards.concat_array(parts, "embeddings", tmp) if retriever != "bm25" else None
        ChunkDatastore.finish(tmp, folder, spec, files, retriever=retriever, encoder=encoder, batch_size=1,
                              key_dtype=emb["dtype"] if emb else "float32", chunker_spec=chunker_spec,
                              progress=progress, timer=timer, lm=lm, embeddings=emb,
                              extra={"merged_from": [p.name for p in parts]})
    return folder
