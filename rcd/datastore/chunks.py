"""Chunk datastore (the "what = chunks" unit, as in RAG / In-Context RALM / REPLUG).

Entry i is a passage: ``text(i)``, cut from corpus row ``row(i)`` (id ``doc_id(i)``) by
:mod:`rcd.datastore.chunking` (``tokens`` | ``sentence`` | ``record``). It is found by
``dense`` (cosine similarity of unit embeddings from a sentence encoder,
:mod:`rcd.datastore.encoders`; default the bundled MiniLM), ``bm25`` or ``hybrid`` (reciprocal
rank fusion of both): :mod:`rcd.datastore.retrievers` defines them (one implementation for
every unit that stores passages).

``search(queries, k)`` is batched and returns :class:`ChunkHits` ([N, k] ids / scores on the
model's device, higher score = better; id -1 = no hit, score -inf, text ""). With ``metric=l2``
the dense score is minus the squared distance.

On disk (see :mod:`rcd.datastore.base` for the folder, manifest and atomic build)::

    texts.bin + texts_offsets.npy        UTF-8 passages, entry i = bytes[off[i]:off[i+1]]
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
``[i·R//n, (i+1)·R//n)`` of the R corpus rows into their own folder; :func:`merge_shards`
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
from rcd.datastore.chunking import Chunk, Chunker
from rcd.datastore.index import IndexSpec, load_or_build_index
from rcd.datastore.retrievers import Retriever, build_bm25, check_retriever, load_bm25
from rcd.datastore.shards import shard_label, shard_rows
from rcd.datastore.storage import (DatastoreError, NpyAppender, Strings, StringsWriter, concat_array, concat_strings,
                                   folder_bytes, open_array)
from rcd.datastore.unit import Plan, Unit, UnitParams

log = logging.getLogger(__name__)

ROW_BLOCK = 256  # corpus rows chunked per step


@dataclass
class ChunkParams(UnitParams):
    """``conf/datastore/chunks.yaml``: how passages are cut, embedded and searched."""

    chunking: str = "tokens"
    chunk_size: int = 128
    overlap: int = 32
    retriever: str = "dense"
    encoder: Union[str, Any] = "minilm"
    index_factory: str = "Flat"
    metric: str = "ip"
    rrf_k: int = 60
    candidates: int = 100
    batch_size: int = 64          # encoder batch
    max_chunks: Optional[int] = None
    key_dtype: str = "float32"
    nprobe: int = 32
    ef_search: int = 128
    use_gpu: Optional[bool] = None
    encoder_device: Any = None


# --------------------------------------------------------------------------- writing entries
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


def finish_entries(tmp: Path, spec: dict, files: dict, *, retriever: str, encoder, batch_size: int, key_dtype: str,
                   chunker_spec: dict, progress: bool, timer, lm=None, embeddings: Optional[dict] = None,
                   extra: Optional[dict] = None) -> dict:
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


def write_chunk_store(tmp: Path, plan: Plan, p: ChunkParams, lm, corpus_ds, progress: bool,
                      on_chunks: Optional[Callable[[list[Chunk]], None]] = None) -> dict:
    """Chunk, embed and index the plan's corpus rows into the (new, empty) folder ``tmp``."""
    timer = base.Timer()
    chunker = plan.parts["chunker"]
    tmp.mkdir(parents=True, exist_ok=True)
    files = write_entries(tmp, chunker, corpus_ds, shard_rows(len(corpus_ds), plan.shard),
                          max_chunks=p.max_chunks, progress=progress, on_chunks=on_chunks)
    return finish_entries(tmp, plan.parts["entries_spec"], files, retriever=p.retriever,
                          encoder=plan.parts["encoder"], batch_size=p.batch_size, key_dtype=p.key_dtype,
                          chunker_spec=chunker.spec(), progress=progress, timer=timer, lm=lm)


def merge_entry_files(parts: list[Path], tmp: Path) -> dict:
    """Merge the entry files every chunk store has (texts, rows, spans, doc ids)."""
    manifests = [base.read_manifest(p) for p in parts]
    for a, b in zip(manifests, manifests[1:]):
        if a["rows"][1] != b["rows"][0]:
            raise DatastoreError(f"cannot merge: shards cover rows {a['rows']} and {b['rows']}, not contiguous")
    return {"size": sum(m["size"] for m in manifests), "rows": [manifests[0]["rows"][0], manifests[-1]["rows"][1]],
            **{key: concat_strings(parts, [m[key] for m in manifests], tmp) for key in ("texts", "doc_ids")},
            **{key: concat_array(parts, [m[key] for m in manifests], tmp) for key in ("chunk_rows", "chunk_spans")}}


def merge_chunk_store(tmp: Path, plan: Plan, parts: list[Path], p: ChunkParams, lm, progress: bool) -> dict:
    """Concatenate chunk-store shard folders ``parts`` (in order) into the new folder ``tmp``.

    Texts, rows, spans, doc ids and embeddings are streamed; BM25 is rebuilt over all entries
    (its statistics are global); the FAISS index is built on first load.
    """
    timer = base.Timer()
    tmp.mkdir(parents=True, exist_ok=True)
    files = merge_entry_files(parts, tmp)
    emb = (concat_array(parts, [base.read_manifest(q)["embeddings"] for q in parts], tmp)
           if p.retriever != "bm25" else None)
    return finish_entries(tmp, plan.parts["entries_spec"], files, retriever=p.retriever,
                          encoder=plan.parts["encoder"], batch_size=1,
                          key_dtype=emb["dtype"] if emb else "float32", chunker_spec=plan.parts["chunker"].spec(),
                          progress=progress, timer=timer, lm=lm, embeddings=emb,
                          extra={"merged_from": [q.name for q in parts]})


# --------------------------------------------------------------------------- hits
@dataclass
class ChunkHits:
    """k best entries for N queries: ids [N, k] (-1 = no hit), scores [N, k] (higher = better),
    texts [N][k] and doc_ids [N][k] (corpus row id of each passage; "" for no hit)."""

    ids: torch.LongTensor
    scores: torch.FloatTensor
    texts: list[list[str]]
    doc_ids: list[list[str]]


# --------------------------------------------------------------------------- datastore
class ChunkDatastore:
    """Passages with dense (cosine), BM25 or hybrid (RRF) search; see the module docstring."""

    unit = "chunks"

    def __init__(self, folder: Path, manifest: dict, *, searcher: Optional[Retriever] = None, device=None):
        self.folder = Path(folder)
        self.manifest = manifest
        self.searcher = searcher
        self.retriever = searcher.method if searcher is not None else manifest["retriever"]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.texts = Strings(self.folder, manifest["texts"])
        self.doc_id_strings = Strings(self.folder, manifest["doc_ids"])
        self.rows = open_array(self.folder, manifest["chunk_rows"])
        self.spans = open_array(self.folder, manifest["chunk_spans"])
        self.row_start = int(manifest["rows"][0])
        self.embeddings = open_array(self.folder, manifest["embeddings"]) if manifest.get("embeddings") else None
        if len(self.texts) != len(self) or self.rows.shape[0] != len(self):
            raise DatastoreError(f"{self.folder}: entry files disagree on the number of entries; "
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

    # ---------------------------------------------------------------- spec / load
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
    def load(cls, folder: Path, lm=None, *, encoder=None, retriever: Optional[str] = None,
             index: Optional[IndexSpec] = None, rrf_k: int = 60, candidates: int = 100, device=None,
             progress: bool = False) -> "ChunkDatastore":
        """Open a chunk datastore; ``retriever`` may pick a part of a hybrid one (dense or bm25);
        ``index`` is the dense index (default exact inner product)."""
        folder = Path(folder)
        index = index if index is not None else IndexSpec(metric="ip")
        manifest = base.read_manifest(folder)
        if manifest.get("unit") != "chunks":
            raise DatastoreError(f"{folder} holds a {manifest.get('unit')!r} datastore, not chunks")
        built = manifest["retriever"]
        retriever = retriever or built
        check_retriever(retriever)
        if built != "hybrid" and retriever != built:
            raise DatastoreError(f"{folder} was built for retriever={built!r} and cannot serve {retriever!r}; "
                                 f"build it with datastore.retriever={retriever}")
        enc = faiss_index = bm25 = None
        if retriever in ("dense", "hybrid"):
            enc = check_encoder(manifest["encoder"], encoder, folder,
                                device=device or (lm.device if lm is not None else None))
            emb = open_array(folder, manifest["embeddings"])
            faiss_index = load_or_build_index(folder, emb, index, progress=progress)
        if retriever in ("bm25", "hybrid"):
            bm25 = load_bm25(folder, manifest["bm25"])
        searcher = Retriever(retriever, manifest["size"], encoder=enc, index=faiss_index, metric=index.metric,
                             bm25=bm25, rrf_k=rrf_k, candidates=candidates)
        dev = device if device is not None else (lm.device if lm is not None else "cpu")
        return cls(folder, manifest, searcher=searcher, device=dev)

    # ---------------------------------------------------------------- search
    @property
    def encoder(self):
        return self.searcher.encoder

    @property
    def index(self):
        return self.searcher.index

    @property
    def metric(self) -> str:
        return self.searcher.metric

    def encode(self, queries: Sequence[str]) -> torch.Tensor:
        """Query embeddings [N, d] (float32, CPU) in the space of the entries (for :meth:`search_vectors`)."""
        if self.searcher is None or self.encoder is None:
            raise ValueError(f"{self.folder} is searched with retriever={self.retriever!r}: it has no encoder")
        return torch.from_numpy(self.searcher.embed(queries))

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
        if self.searcher is None:
            raise ValueError(f"{self.folder} was opened without a retriever (entries only)")
        return self.searcher.search_ids(queries, k)

    def search(self, queries: list[str], k: int) -> ChunkHits:
        """k best passages for each query (one batched call)."""
        return self._hits(*self.search_ids(queries, k))

    def search_vectors(self, q: torch.Tensor, k: int) -> ChunkHits:
        """Dense search with query embeddings q [N, d] (normalised here if the encoder normalises)."""
        if self.searcher is None or self.index is None:
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
        return self._hits(*self.searcher.dense(q.numpy(), k))

    def describe(self) -> dict[str, Any]:
        enc = self.manifest.get("encoder") or {}
        return {"unit": "chunks", "size": len(self), "folder": str(self.folder),
                "index": self.searcher.describe() if self.searcher is not None else "",
                "bytes": folder_bytes(self.folder), "retriever": self.retriever, "encoder": enc.get("name"),
                "chunking": self.manifest.get("chunking"), "metric": self.metric if self.index is not None else None}


def check_encoder(recorded: dict, encoder, folder: Path, device=None):
    """Load ``encoder`` and refuse it unless its weights fingerprint is the one recorded at build time."""
    from rcd.datastore.encoders import ALIASES, load_encoder

    if encoder is None:  # the encoder recorded at build time
        if recorded["name"] in ALIASES:
            encoder = recorded["name"]
        elif Path(recorded["source"]).is_dir() or recorded["source"] != "in-memory":
            encoder = recorded["source"]
        else:
            raise DatastoreError(f"datastore {folder} was built with an in-memory encoder; pass the same "
                                 "encoder (encoder=...) to load it")
    enc = load_encoder(encoder, device=device, normalize=recorded.get("normalize", True))
    if enc.fingerprint != recorded["fingerprint"] or enc.dim != recorded["dim"]:
        raise DatastoreError(
            f"datastore {folder} was built with encoder {recorded['name']!r} (weights fingerprint "
            f"{recorded['fingerprint']}, dim {recorded['dim']}) and cannot be searched with encoder {enc.name!r} "
            f"(fingerprint {enc.fingerprint}, dim {enc.dim}): queries and passages would be embedded in different "
            f"spaces. Build a datastore for this encoder (same command with datastore.encoder={enc.name}).")
    return enc


def resolve_parts(lm, corpus_ds, corpus_name: str, p: ChunkParams, shard) -> dict:
    """Check the passage settings of ``p`` and resolve them: ``{"chunker", "encoder", "entries_spec"}``
    (what build, merge and load of every unit that stores passages share)."""
    from rcd.corpus import fingerprint as corpus_fingerprint

    check_retriever(p.retriever)
    if p.key_dtype not in ("float16", "float32"):
        raise ValueError(f"key_dtype={p.key_dtype!r}: choose float16 or float32")
    if shard is not None and p.max_chunks is not None:
        raise ValueError("max_chunks cannot be combined with sharding (each shard would be capped separately, "
                         "so the merged datastore would differ from an unsharded build)")
    chunker = Chunker(p.chunking, p.chunk_size, p.overlap, tokenizer=lm.tokenizer if lm is not None else None)
    enc = None
    if p.retriever in ("dense", "hybrid"):
        from rcd.datastore.encoders import load_encoder

        enc = load_encoder(p.encoder, device=p.encoder_device or (lm.device if lm is not None else None))
    spec = ChunkDatastore.spec(corpus_name, corpus_fingerprint(corpus_ds), chunker, p.retriever,
                               enc.identity() if enc is not None else None, p.max_chunks, p.key_dtype, shard)
    return {"chunker": chunker, "encoder": enc, "entries_spec": spec}


def load_chunk_store(folder: Path, plan: Plan, p: ChunkParams, lm, progress: bool) -> ChunkDatastore:
    return ChunkDatastore.load(folder, lm, encoder=plan.parts["encoder"], index=p.index_spec(), rrf_k=p.rrf_k,
                               candidates=p.candidates, progress=progress)


class ChunkUnit(Unit):
    name = "chunks"
    Params = ChunkParams

    def plan(self, lm, corpus_ds, corpus_name, p, shard) -> Plan:
        parts = resolve_parts(lm, corpus_ds, corpus_name, p, shard)
        label = parts["encoder"].name if parts["encoder"] is not None else "bm25"
        return Plan(parts["entries_spec"], shard_label(corpus_name, shard), label, shard, parts)

    def needs_model(self, p) -> bool:
        return p.chunking == "tokens"  # LM-token chunking; sentences and records need no model

    def write(self, tmp, plan, p, lm, corpus_ds, progress) -> None:
        write_chunk_store(tmp, plan, p, lm, corpus_ds, progress)

    def merge(self, tmp, plan, parts, p, lm, progress) -> None:
        merge_chunk_store(tmp, plan, parts, p, lm, progress)

    def load(self, folder, plan, p, lm, progress, **extra) -> ChunkDatastore:
        return load_chunk_store(folder, plan, p, lm, progress)


UNIT = ChunkUnit()
build_or_load = UNIT.build_or_load
merge_shards = UNIT.merge_shards
