"""Tag datastore (the "what = tags" unit): labels of the nearest entries, with weights.

Entries are chunks of the corpus (:mod:`rcd.datastore.chunking`, searched exactly like a
:class:`~rcd.datastore.chunks.ChunkDatastore`: dense with the same encoder, BM25 or hybrid); each
entry carries a bag of tags with counts c_{j,t}. ``search(queries, k)`` finds the k nearest
entries j (scores s_j) and returns every tag t of those entries with weight

    W_t = Σ_j w_j · c_{j,t} / Σ_t' c_{j,t'},
    w_j = softmax_j(s_j / T)   (``weighting=softmax``; ``score``: w_j ∝ max(s_j, 0); ``uniform``),

sorted by W_t (ties by tag); the W_t of one query sum to 1 when its entries have tags.
T defaults to 0.05 for dense (cosine), 1.0 for BM25 and 0.01 for hybrid (RRF scores ~1/60).

Where the tags come from:

* a corpus column — ``tag_field`` (default: a column named ``tags`` if the corpus has one). A
  list value gives several tags (a repeated value counts twice), a string one tag; every chunk
  of a row gets the row's tags.
* otherwise the rule-based extractor :func:`rcd.datastore.tag_extract.extract_tags` (head lemmas,
  speaker lines, upper-case runs, proper nouns, years; its module docstring states the rules),
  applied to each entry's text.

:meth:`TagHits.tags_token_ids` gives each tag's token ids with and without a leading space, and
:meth:`TagHits.bias_evidence` the (token ids, weights) rows that ``TagBias.set_evidence`` takes.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from rcd.datastore import base
from rcd.datastore.chunks import ChunkDatastore, ChunkParams, merge_chunk_store, resolve_parts, write_chunk_store
from rcd.datastore.index import IndexSpec
from rcd.datastore.shards import shard_label
from rcd.datastore.storage import DatastoreError, NpyAppender, Strings, StringsWriter, folder_bytes, open_array
from rcd.datastore.unit import Plan, Unit

from rcd.datastore.tag_extract import EXTRACTOR_VERSION, extract_tags

log = logging.getLogger(__name__)

WEIGHTINGS = ("softmax", "score", "uniform")
DEFAULT_TEMPERATURE = {"dense": 0.05, "bm25": 1.0, "hybrid": 0.01}

def tag_token_ids(tokenizer, tag: str) -> tuple[list[int], list[int]]:
    """Token ids of ``tag`` as written at the start of a text and after a space."""
    plain = tokenizer(tag, add_special_tokens=False)["input_ids"]
    spaced = tokenizer(" " + tag, add_special_tokens=False)["input_ids"]
    return list(plain), list(spaced)


# --------------------------------------------------------------------------- hits
@dataclass
class TagHits:
    """Per query: tags sorted by weight, their weights, and the entries they came from."""

    tags: list[list[str]]
    weights: list[list[float]]
    entry_ids: torch.LongTensor  # [N, k], -1 = no entry
    entry_scores: torch.FloatTensor  # [N, k]

    def tags_token_ids(self, tokenizer) -> list[list[tuple[list[int], list[int]]]]:
        """For each query and tag: (ids without a leading space, ids with a leading space)."""
        cache: dict[str, tuple[list[int], list[int]]] = {}
        out = []
        for row in self.tags:
            for t in row:
                if t not in cache:
                    cache[t] = tag_token_ids(tokenizer, t)
            out.append([cache[t] for t in row])
        return out

    def bias_evidence(self, tokenizer) -> tuple[list[list[list[int]]], list[list[float]]]:
        """Rows of (token ids, weight) for ``TagBias.set_evidence``: both spellings of each tag carry its weight."""
        ids_rows, w_rows = [], []
        for row, ws in zip(self.tags_token_ids(tokenizer), self.weights):
            ids, weights = [], []
            for (plain, spaced), w in zip(row, ws):
                for variant in (plain, spaced) if plain != spaced else (plain,):
                    if variant:
                        ids.append(variant)
                        weights.append(w)
            ids_rows.append(ids)
            w_rows.append(weights)
        return ids_rows, w_rows


# --------------------------------------------------------------------------- datastore
class TagDatastore:
    """Entries (chunks) with tag bags; ``search`` aggregates the tags of the k nearest entries."""

    unit = "tags"

    def __init__(self, folder: Path, manifest: dict, entries: ChunkDatastore, *, weighting: str = "softmax",
                 temperature: Optional[float] = None, max_tags: Optional[int] = None):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
        self.folder = Path(folder)
        self.manifest = manifest
        self.entries = entries
        self.weighting = weighting
        self.temperature = float(temperature if temperature is not None else DEFAULT_TEMPERATURE[entries.retriever])
        if self.temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        self.max_tags = max_tags
        self.vocab_strings = Strings(self.folder, manifest["tag_vocab"])
        self.vocab = [self.vocab_strings[i] for i in range(len(self.vocab_strings))]
        self.tag_offsets = np.asarray(open_array(self.folder, manifest["entry_tag_offsets"]))
        self.tag_ids = open_array(self.folder, manifest["entry_tag_ids"])
        self.tag_counts = open_array(self.folder, manifest["entry_tag_counts"])
        if len(self.tag_offsets) != len(entries) + 1:
            raise DatastoreError(f"{self.folder}: tags cover {len(self.tag_offsets) - 1} entries but there are "
                                 f"{len(entries)}; delete {self.folder} and rebuild")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def device(self) -> torch.device:
        return self.entries.device

    def text(self, i: int) -> str:
        return self.entries.text(i)

    def doc_id(self, i: int) -> str:
        return self.entries.doc_id(i)

    def entry_tags(self, i: int) -> dict[str, float]:
        """Tags of entry i with their counts."""
        s, e = int(self.tag_offsets[i]), int(self.tag_offsets[i + 1])
        return {self.vocab[int(t)]: float(c) for t, c in zip(self.tag_ids[s:e], self.tag_counts[s:e])}

    # ---------------------------------------------------------------- search
    def entry_weights(self, scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """w_j per row from entry scores (see module doc); 0 where there is no entry."""
        w = np.zeros_like(scores, dtype=np.float64)
        for r in range(scores.shape[0]):
            v = valid[r]
            if not v.any():
                continue
            s = scores[r, v].astype(np.float64)
            if self.weighting == "softmax":
                z = np.exp((s - s.max()) / self.temperature)
            elif self.weighting == "score":
                z = np.maximum(s, 0.0)
                if z.sum() <= 0:
                    z = np.ones_like(s)
            else:
                z = np.ones_like(s)
            w[r, v] = z / z.sum()
        return w

    def aggregate(self, ids: np.ndarray, scores: np.ndarray, max_tags: Optional[int] = None) -> TagHits:
        valid = ids >= 0
        w = self.entry_weights(scores, valid)
        max_tags = max_tags if max_tags is not None else self.max_tags
        tags, weights = [], []
        for r in range(ids.shape[0]):
            acc: dict[int, float] = {}
            for j in np.nonzero(valid[r])[0]:
                s, e = int(self.tag_offsets[ids[r, j]]), int(self.tag_offsets[ids[r, j] + 1])
                counts = np.asarray(self.tag_counts[s:e], dtype=np.float64)
                if counts.sum() <= 0:
                    continue
                for t, c in zip(self.tag_ids[s:e], counts / counts.sum()):
                    acc[int(t)] = acc.get(int(t), 0.0) + float(w[r, j] * c)
            best = sorted(((self.vocab[t], x) for t, x in acc.items()), key=lambda tx: (-tx[1], tx[0]))
            if max_tags is not None:
                best = best[:max_tags]
            tags.append([t for t, _ in best])
            weights.append([float(x) for _, x in best])
        dev = self.entries.device
        return TagHits(tags=tags, weights=weights, entry_ids=torch.from_numpy(ids).to(dev),
                       entry_scores=torch.from_numpy(scores.astype(np.float32)).to(dev))

    def search(self, queries: list[str], k: int, max_tags: Optional[int] = None) -> TagHits:
        """Tags of the k entries nearest to each query, weighted and sorted (batched)."""
        return self.aggregate(*self.entries.search_ids(queries, k), max_tags=max_tags)

    def search_vectors(self, q: torch.Tensor, k: int, max_tags: Optional[int] = None) -> TagHits:
        """Like :meth:`search` with query embeddings [N, d] (dense entries only)."""
        hits = self.entries.search_vectors(q, k)
        return self.aggregate(hits.ids.cpu().numpy(), hits.scores.cpu().numpy(), max_tags=max_tags)

    def describe(self) -> dict[str, Any]:
        d = self.entries.describe()
        d.update({"unit": "tags", "folder": str(self.folder), "bytes": folder_bytes(self.folder),
                  "tags": len(self.vocab), "tag_source": self.manifest.get("tag_source"),
                  "weighting": self.weighting, "temperature": self.temperature})
        return d

    # ---------------------------------------------------------------- load
    @classmethod
    def load(cls, folder: Path, lm=None, *, encoder=None, retriever: Optional[str] = None, weighting="softmax",
             temperature=None, max_tags=None, index: Optional[IndexSpec] = None, rrf_k=60, candidates=100,
             progress=False) -> "TagDatastore":
        folder = Path(folder)
        manifest = base.read_manifest(folder)
        if manifest.get("unit") != "tags":
            raise DatastoreError(f"{folder} holds a {manifest.get('unit')!r} datastore, not tags")
        entries = ChunkDatastore.load(folder / "entries", lm, encoder=encoder, retriever=retriever, index=index,
                                      rrf_k=rrf_k, candidates=candidates, progress=progress)
        return cls(folder, manifest, entries, weighting=weighting, temperature=temperature, max_tags=max_tags)


class _RowReader:
    """Values of a few corpus columns by row, read in blocks."""

    def __init__(self, corpus_ds, columns: list[str], block: int = 1024):
        self.ds = corpus_ds.select_columns(columns) if columns else corpus_ds
        self.columns, self.block = columns, block
        self.start, self.data = None, {}

    def get(self, row: int, column: str):
        if self.start is None or not self.start <= row < self.start + self.block:
            self.start = row
            self.data = self.ds[row:row + self.block] if self.columns else {}
        return self.data[column][row - self.start]


def _column_tags(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    return [str(v).strip() for v in value if v is not None and str(v).strip()]


def write_tags(tmp: Path, entries: ChunkDatastore, corpus_ds, tag_field: Optional[str], title_field: Optional[str],
               progress: bool) -> dict:
    """Tag bags of every entry (from the column or the extractor) as CSR arrays + vocabulary."""
    cols = [c for c in (tag_field, title_field) if c]
    reader = _RowReader(corpus_ds, cols)
    vocab: dict[str, int] = {}
    vocab_w = StringsWriter(tmp, "tag_vocab")
    offs = NpyAppender(tmp / "entry_tag_offsets.npy", np.int64)
    tid = NpyAppender(tmp / "entry_tag_ids.npy", np.int32)
    cnt = NpyAppender(tmp / "entry_tag_counts.npy", np.float32)
    offs.append([0])
    total = 0
    it = range(len(entries))
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="tags", unit="entry", mininterval=1.0)
    new_tags: list[str] = []
    for i in it:
        row = entries.row(i)
        if tag_field:
            bag = Counter(_column_tags(reader.get(row, tag_field)))
        else:
            titles = _column_tags(reader.get(row, title_field)) if title_field else []
            bag = extract_tags(entries.text(i), at_row_start=entries.span(i)[0] == 0,
                               title=titles[0] if titles else None)
            for t in titles:
                if t not in bag:
                    bag[t] += 1
        ids, counts = [], []
        for tag, c in bag.items():
            if tag not in vocab:
                vocab[tag] = len(vocab)
                new_tags.append(tag)
            ids.append(vocab[tag])
            counts.append(c)
        if new_tags:
            vocab_w.add(new_tags)
            new_tags = []
        tid.append(ids)
        cnt.append(counts)
        total += len(ids)
        offs.append([total])
    return {"tag_vocab": vocab_w.close(), "entry_tag_offsets": offs.close(), "entry_tag_ids": tid.close(),
            "entry_tag_counts": cnt.close(), "tags": len(vocab), "tag_assignments": total}


def merge_tag_files(parts: list[Path], tmp: Path) -> dict:
    """Concatenate tag CSR arrays of shards, remapping tag ids into one first-seen vocabulary."""
    vocab: dict[str, int] = {}
    vocab_w = StringsWriter(tmp, "tag_vocab")
    offs = NpyAppender(tmp / "entry_tag_offsets.npy", np.int64)
    tid = NpyAppender(tmp / "entry_tag_ids.npy", np.int32)
    cnt = NpyAppender(tmp / "entry_tag_counts.npy", np.float32)
    offs.append([0])
    total = 0
    for p in parts:
        m = base.read_manifest(p)
        names = Strings(p, m["tag_vocab"])
        o = np.asarray(open_array(p, m["entry_tag_offsets"]))
        ids = np.asarray(open_array(p, m["entry_tag_ids"]))
        counts = np.asarray(open_array(p, m["entry_tag_counts"]))
        # first-seen order over this shard's entries = order of its local ids (they were assigned first-seen)
        remap = np.zeros(len(names), dtype=np.int32)
        new = []
        for local in range(len(names)):
            t = names[local]
            if t not in vocab:
                vocab[t] = len(vocab)
                new.append(t)
            remap[local] = vocab[t]
        vocab_w.add(new)
        tid.append(remap[ids] if len(ids) else ids.astype(np.int32))
        cnt.append(counts)
        offs.append(o[1:] + total)
        total += int(o[-1])
    return {"tag_vocab": vocab_w.close(), "entry_tag_offsets": offs.close(), "entry_tag_ids": tid.close(),
            "entry_tag_counts": cnt.close(), "tags": len(vocab), "tag_assignments": total}


# --------------------------------------------------------------------------- build / merge
@dataclass
class TagParams(ChunkParams):
    """``conf/datastore/tags.yaml``: the entries (passage settings, sentence chunks by default), where
    their tags come from, and how the tags of the nearest entries are weighted."""

    chunking: str = "sentence"
    chunk_size: int = 64
    overlap: int = 0
    tag_field: Optional[str] = None
    title_field: Optional[str] = "title"
    weighting: str = "softmax"
    temperature: Optional[float] = None
    max_tags: Optional[int] = None


def _columns_fingerprint(corpus_ds, columns) -> Optional[str]:
    import hashlib

    columns = [c for c in columns if c]
    if not columns:
        return None
    h = hashlib.sha1()
    for c in columns:
        for batch in corpus_ds.select_columns([c]).iter(batch_size=1000):
            h.update(repr(batch[c]).encode())
    return h.hexdigest()[:16]


def _manifest(plan: Plan, tags_files, timer, extra=None) -> dict:
    tag_field, title_field = plan.parts["tag_field"], plan.parts["title_field"]
    return {"format": base.FORMAT, "unit": "tags", "fingerprint": plan.fingerprint, "spec": plan.spec,
            "tag_source": f"column {tag_field!r}" if tag_field else f"extractor {EXTRACTOR_VERSION}"
            + (f" + column {title_field!r}" if title_field else ""), **tags_files,
            "build_seconds": round(timer.seconds, 2), **(extra or {})}


class TagUnit(Unit):
    """Entries are a chunk store in ``entries/``; tag bags are CSR arrays next to it."""

    name = "tags"
    Params = TagParams

    def plan(self, lm, corpus_ds, corpus_name, p, shard) -> Plan:
        from rcd.corpus import fingerprint as corpus_fingerprint

        if p.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={p.weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
        tag_field, title_field = p.tag_field, p.title_field
        if tag_field is None and "tags" in corpus_ds.column_names:
            tag_field = "tags"
        if tag_field is not None and tag_field not in corpus_ds.column_names:
            raise ValueError(f"tag_field={tag_field!r} is not a column of corpus {corpus_name!r} "
                             f"(columns: {corpus_ds.column_names}); use tag_field=null to extract tags from the text")
        if title_field is not None and title_field not in corpus_ds.column_names:
            title_field = None
        parts = resolve_parts(lm, corpus_ds, corpus_name, p, shard)
        spec = {"unit": "tags", "entries": parts["entries_spec"], "tag_field": tag_field, "title_field": title_field,
                "tag_columns": _columns_fingerprint(corpus_ds, (tag_field, title_field)),
                "extractor": None if tag_field else EXTRACTOR_VERSION, "corpus": corpus_fingerprint(corpus_ds)}
        label = parts["encoder"].name if parts["encoder"] is not None else "bm25"
        return Plan(spec, shard_label(corpus_name, shard), label, shard,
                    {**parts, "tag_field": tag_field, "title_field": title_field})

    def needs_model(self, p) -> bool:
        return p.chunking == "tokens"  # LM-token chunking; sentences and records need no model

    def write(self, tmp, plan, p, lm, corpus_ds, progress) -> None:
        timer = base.Timer()
        write_chunk_store(tmp / "entries", plan, p, lm, corpus_ds, progress)
        entries = ChunkDatastore(tmp / "entries", base.read_manifest(tmp / "entries"))
        files = write_tags(tmp, entries, corpus_ds, plan.parts["tag_field"], plan.parts["title_field"], progress)
        del entries
        base.write_manifest(tmp, _manifest(plan, files, timer))

    def merge(self, tmp, plan, parts, p, lm, progress) -> None:
        timer = base.Timer()
        merge_chunk_store(tmp / "entries", plan, [q / "entries" for q in parts], p, lm, progress)
        files = merge_tag_files(parts, tmp)
        base.write_manifest(tmp, _manifest(plan, files, timer, {"merged_from": [q.name for q in parts]}))

    def load(self, folder, plan, p, lm, progress, **extra) -> "TagDatastore":
        return TagDatastore.load(folder, lm, encoder=plan.parts["encoder"], weighting=p.weighting,
                                 temperature=p.temperature, max_tags=p.max_tags, index=p.index_spec(), rrf_k=p.rrf_k,
                                 candidates=p.candidates, progress=progress)


UNIT = TagUnit()
build_or_load = UNIT.build_or_load
merge_shards = UNIT.merge_shards
