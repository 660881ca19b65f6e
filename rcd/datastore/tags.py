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
* otherwise the **extractor** :func:`extract_tags`, applied to each entry's text:

  1. *Head lemmas* — when the entry starts at the start of its row and the row reads
     ``lemma[, lemma…]: gloss`` (the WordNet passage layout: one head line without sentence
     punctuation that contains the row's title, or — without a title column — lemmas of at most
     4 words none of which opens with a function word), each lemma is a tag ("Aalto",
     "Alvar Aalto", …). The row's ``title_field`` column (default ``title``), when present, is a
     tag too.
  2. *Speaker lines* — a line that is only an upper-case name ending in a full stop
     (``MACBETH.``, ``FIRST WITCH.``, ``MRS. FORD.``) gives that name.
  3. *Upper-case runs* — runs of upper-case words of ≥ 2 letters elsewhere (stage directions
     ``[Enter BERTRAM, the COUNTESS OF ROUSILLON]``) give the run ("COUNTESS OF ROUSILLON"),
     possessive 's dropped; headings and stop words (ACT, SCENE, THE, OF, roman numerals, …)
     are trimmed from the ends, and runs made only of them are dropped.
  4. *Proper nouns* — runs of capitalised words ("Alvar Aalto", "Winchester College"; "of"
     may join two of them: "Thane of Cawdor") that do not open a sentence or a line (verse
     capitalises every line). A sentence-opening capitalised word still counts when the same
     word occurs mid-sentence in the entry or is an upper-case tag of the entry ("Macbeth" and
     "MACBETH"). Interjections and pronouns (I, O, Ay, Alas, Enter, Exit, …) are not names.
  5. *Years* — four-digit numbers 1000–2099, and every number of a life span in parentheses
     ("(1898-1976)", "(427-347 BC)").

  A tag's count is its number of occurrences in the entry (1 for head lemmas and the title).

:meth:`TagHits.tags_token_ids` gives each tag's token ids with and without a leading space, and
:meth:`TagHits.bias_evidence` the (token ids, weights) rows that ``TagBias.set_evidence`` takes.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from rcd.datastore import base, shards
from rcd.datastore.chunks import (ChunkDatastore, NpyAppender, Strings, StringsWriter, folder_bytes,
                                  merge_chunk_folders, resolve_parts, shard_label, shard_rows)

log = logging.getLogger(__name__)

WEIGHTINGS = ("softmax", "score", "uniform")
DEFAULT_TEMPERATURE = {"dense": 0.05, "bm25": 1.0, "hybrid": 0.01}

# --------------------------------------------------------------------------- extractor
_CAPS_STOP = {
    "ACT", "SCENE", "THE", "OF", "AND", "A", "AN", "TO", "IN", "ON", "AT", "BY", "FOR", "WITH", "END", "EPILOGUE",
    "PROLOGUE", "CHORUS", "EXIT", "EXEUNT", "ENTER", "FINIS", "PERSONS", "REPRESENTED", "DRAMATIS", "PERSONAE",
    "SONNET", "SONNETS", "BC", "AD", "THAT", "ALL", "IS", "OR", "BUT", "NOT", "NO", "SO", "AS", "IT", "HIS", "HER", "MY",
}
_ROMAN = re.compile(r"^[IVXLC]+$")
_NAME_STOP = {
    "I", "I'll", "I'm", "I'd", "I've", "O", "Oh", "Ah", "Ay", "Aye", "Alas", "Enter", "Exit", "Exeunt", "Re-enter",
    "Scene", "Act", "Thou", "Thee", "Thy", "Ha", "Ho", "Fie", "Tut", "Nay", "Yea", "Amen", "Finis", "Mr", "Mrs",
}
_SPEAKER = re.compile(r"^[ \t]*([A-Z][A-Z'\-]*(?:\.?[ \t]+[A-Z][A-Z'\-]*)*)[ \t]*\.[ \t]*$", re.M)
_CAPS_RUN = re.compile(r"(?<![A-Za-z'])[A-Z][A-Z'\-]+(?:\.?[ \t]+[A-Z][A-Z'\-]+)*(?![A-Za-z])")
_TITLE_WORD = r"[A-Z][a-z]+(?:['\-][A-Za-z]+)*"
_NAME_RUN = re.compile(rf"(?<![A-Za-z'\-]){_TITLE_WORD}(?:(?:[ \t]+|[ \t]+of[ \t]+){_TITLE_WORD})*(?![A-Za-z])")
_YEAR = re.compile(r"(?<!\d)(1\d{3}|20\d{2})(?!\d)")
_SPAN = re.compile(r"\(([^()]*?\d{1,4}\s*-\s*\d{1,4}[^()]*)\)")
_NUM = re.compile(r"(?<!\d)\d{1,4}(?!\d)")
_HEAD = re.compile(r"^\s*([^:\n]{1,200}?)\s*:\s")


def _strip_possessive(w: str) -> str:
    return re.sub(r"['’][sS]$", "", w)


def _trim_caps(words: list[str]) -> list[str]:
    while words and (words[0] in _CAPS_STOP or _ROMAN.match(words[0])):
        words = words[1:]
    while words and (words[-1] in _CAPS_STOP or _ROMAN.match(words[-1])):
        words = words[:-1]
    return words


def _sentence_initial(text: str, pos: int) -> bool:
    """Whether position ``pos`` opens a sentence or a line (ignoring quotes/brackets/spaces)."""
    j = pos - 1
    while j >= 0 and text[j] in " \t\"'([‘“":
        j -= 1
    return j < 0 or text[j] in ".!?\n[" or text[j - 1:j + 1] == "--"


_HEAD_OPENERS = {"to", "or", "and", "but", "if", "that", "the", "a", "an", "when", "what", "who", "how", "why", "o",
                 "i", "my", "thy", "this", "so", "then", "now", "nor", "yet", "for", "as", "in", "of", "with"}


def head_lemmas(text: str, title: Optional[str] = None) -> list[str]:
    """Lemmas of a ``lemma[, lemma…]: gloss`` entry (the WordNet passage layout), else [].

    The head is one line without sentence punctuation. With a ``title`` it must be one of the
    lemmas; without, every lemma has at most 4 words and none opens with a function word (so a
    verse line ending in a colon is not taken for a head).
    """
    m = _HEAD.match(text)
    if not m:
        return []
    head = m.group(1)
    if re.search(r"[.!?;\"()\[\]]", head):
        return []
    lemmas = [h.strip() for h in head.split(",") if h.strip()]
    if title is not None:
        return lemmas if title.strip().lower() in {x.lower() for x in lemmas} else []
    if any(len(x.split()) > 4 or x.split()[0].lower() in _HEAD_OPENERS for x in lemmas):
        return []
    return lemmas


def extract_tags(text: str, at_row_start: bool = True, title: Optional[str] = None) -> Counter:
    """Tags of one entry with their counts (rules 1-5 of the module docstring; the title itself is
    added by the caller)."""
    tags: Counter = Counter()
    body_start = 0
    if at_row_start:
        lemmas = head_lemmas(text, title)
        if lemmas:
            for lemma in lemmas:
                tags[lemma] += 1
            body_start = _HEAD.match(text).end()
    body = text  # scanned from body_start, so the head's colon does not open a sentence
    speaker_spans = []
    for m in _SPEAKER.finditer(body, body_start):
        words = _trim_caps([_strip_possessive(w) for w in m.group(1).split()])
        speaker_spans.append(m.span(1))
        if words and any(len(w) >= 2 for w in words):
            tags[" ".join(words)] += 1
    for m in _CAPS_RUN.finditer(body, body_start):
        if any(s <= m.start() < e for s, e in speaker_spans):
            continue
        words = _trim_caps([_strip_possessive(w) for w in m.group(0).split()])
        if words and sum(len(w) for w in words) >= 2 and not (len(words) == 1 and len(words[0]) < 2):
            tags[" ".join(words)] += 1
    upper = {t.upper() for t in tags}
    runs = [(m.start(), m.group(0)) for m in _NAME_RUN.finditer(body, body_start)]
    mid_words = {w for pos, run in runs if not _sentence_initial(body, pos) for w in run.split()}
    for pos, run in runs:
        words = [_strip_possessive(w) for w in re.split(r"[ \t]+", run)]
        if _sentence_initial(body, pos):
            # drop the opening word unless it is known as a name in this entry
            if words[0] not in mid_words and words[0].upper() not in upper:
                words = words[1:]
                while words and words[0] == "of":
                    words = words[1:]
        while words and words[0] in _NAME_STOP:
            words = words[1:]
        while words and words[-1] == "of":
            words = words[:-1]
        if not words or (len(words) == 1 and words[0] in _NAME_STOP):
            continue
        tags[" ".join(words)] += 1
    years = [m.group(1) for m in _YEAR.finditer(body, body_start)]
    for m in _SPAN.finditer(body, body_start):
        for num in _NUM.findall(m.group(1)):
            if num not in years:
                years.append(num)
    for y in years:
        tags[y] += 1
    return tags


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
        self.tag_offsets = np.asarray(base.open_array(self.folder, manifest["entry_tag_offsets"]))
        self.tag_ids = base.open_array(self.folder, manifest["entry_tag_ids"])
        self.tag_counts = base.open_array(self.folder, manifest["entry_tag_counts"])
        if len(self.tag_offsets) != len(entries) + 1:
            raise base.DatastoreError(f"{self.folder}: tags cover {len(self.tag_offsets) - 1} entries but there are "
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
             temperature=None, max_tags=None, index_factory="Flat", metric="ip", nprobe=32, ef_search=128,
             use_gpu=None, rrf_k=60, candidates=100, progress=False) -> "TagDatastore":
        folder = Path(folder)
        manifest = base.read_manifest(folder)
        if manifest.get("unit") != "tags":
            raise base.DatastoreError(f"{folder} holds a {manifest.get('unit')!r} datastore, not tags")
        entries = ChunkDatastore.load(folder / "entries", lm, encoder=encoder, retriever=retriever,
                                      index_factory=index_factory, metric=metric, nprobe=nprobe, ef_search=ef_search,
                                      use_gpu=use_gpu, rrf_k=rrf_k, candidates=candidates, progress=progress)
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


def _resolve(lm, corpus_ds, corpus_name, *, tag_field, title_field, shard, num_shards, **chunk_kw):
    from rcd.corpus import fingerprint as corpus_fingerprint

    if corpus_ds is not None and tag_field is None and "tags" in corpus_ds.column_names:
        tag_field = "tags"
    if corpus_ds is not None and tag_field is not None and tag_field not in corpus_ds.column_names:
        raise ValueError(f"tag_field={tag_field!r} is not a column of corpus {corpus_name!r} "
                         f"(columns: {corpus_ds.column_names}); use tag_field=null to extract tags from the text")
    if corpus_ds is not None and title_field is not None and title_field not in corpus_ds.column_names:
        title_field = None
    chunker, enc, sh, espec = resolve_parts(lm, corpus_ds, corpus_name, shard=shard, num_shards=num_shards, **chunk_kw)
    cols_fp = None
    if tag_field or title_field:
        import hashlib

        h = hashlib.sha1()
        for c in (tag_field, title_field):
            if c:
                for batch in corpus_ds.select_columns([c]).iter(batch_size=1000):
                    h.update(repr(batch[c]).encode())
        cols_fp = h.hexdigest()[:16]
    spec = {"unit": "tags", "entries": espec, "tag_field": tag_field, "title_field": title_field,
            "tag_columns": cols_fp, "extractor": None if tag_field else EXTRACTOR_VERSION, "corpus": corpus_fingerprint(corpus_ds)}
    return chunker, enc, sh, espec, spec, tag_field, title_field


EXTRACTOR_VERSION = "rules-2"


def _folder(root, corpus_name, enc, sh, spec) -> tuple[Path, bool]:
    fp = base.fingerprint(spec)
    found = base.find_existing(root, fp)
    if found is not None:
        return found, True
    return Path(root) / base.folder_name("tags", shard_label(corpus_name, sh), enc.name if enc else "bm25", fp), False


def _manifest(spec, tags_files, tag_field, title_field, timer, extra=None) -> dict:
    return {"format": base.FORMAT, "unit": "tags", "fingerprint": base.fingerprint(spec), "spec": spec,
            "tag_source": f"column {tag_field!r}" if tag_field else f"extractor {EXTRACTOR_VERSION}"
            + (f" + column {title_field!r}" if title_field else ""), **tags_files,
            "build_seconds": round(timer.seconds, 2), **(extra or {})}


def build_or_load(lm, corpus_ds, corpus_name: str, root: Path, *, tag_field: Optional[str] = None,
                  title_field: Optional[str] = "title", chunking: str = "sentence", chunk_size: int = 64,
                  overlap: int = 0, retriever: str = "dense", encoder="minilm", index_factory: str = "Flat",
                  metric: str = "ip", rrf_k: int = 60, batch_size: int = 64, max_chunks: Optional[int] = None,
                  weighting: str = "softmax", temperature: Optional[float] = None, max_tags: Optional[int] = None,
                  progress: bool = True, shard: Optional[int] = None, num_shards: Optional[int] = None,
                  key_dtype: str = "float32", nprobe: int = 32, ef_search: int = 128, use_gpu=None,
                  candidates: int = 100, **unused) -> TagDatastore:
    """Reuse the tag datastore with the same fingerprint under ``root`` or build it."""
    if root is None:
        from rcd.paths import cache_dir

        root = cache_dir("datastores")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    chunk_kw = dict(chunking=chunking, chunk_size=chunk_size, overlap=overlap, retriever=retriever, encoder=encoder,
                    max_chunks=max_chunks, key_dtype=key_dtype)
    chunker, enc, sh, espec, spec, tag_field, title_field = _resolve(
        lm, corpus_ds, corpus_name, tag_field=tag_field, title_field=title_field, shard=shard,
        num_shards=num_shards, **chunk_kw)
    folder, exists = _folder(root, corpus_name, enc, sh, spec)
    if not exists:
        timer = base.Timer()
        with base.atomic_folder(folder) as tmp:
            ChunkDatastore.build(corpus_ds, tmp / "entries", espec, chunker, retriever=retriever, encoder=enc,
                                 rows=shard_rows(len(corpus_ds), sh), batch_size=batch_size, key_dtype=key_dtype,
                                 max_chunks=max_chunks, progress=progress, lm=lm)
            entries = ChunkDatastore(tmp / "entries", base.read_manifest(tmp / "entries"), retriever=retriever)
            files = write_tags(tmp, entries, corpus_ds, tag_field, title_field, progress)
            del entries
            base.write_manifest(tmp, _manifest(spec, files, tag_field, title_field, timer))
    return TagDatastore.load(folder, lm, encoder=enc, weighting=weighting, temperature=temperature,
                             max_tags=max_tags, index_factory=index_factory, metric=metric, nprobe=nprobe,
                             ef_search=ef_search, use_gpu=use_gpu, rrf_k=rrf_k, candidates=candidates,
                             progress=progress)


def merge_shards(lm, corpus_ds, corpus_name: str, root: Path, *, num_shards: int, tag_field=None,
                 title_field="title", chunking="sentence", chunk_size=64, overlap=0, retriever="dense",
                 encoder="minilm", index_factory="Flat", metric="ip", rrf_k=60, batch_size=64, max_chunks=None,
                 weighting="softmax", temperature=None, max_tags=None, progress=True, key_dtype="float32",
                 nprobe=32, ef_search=128, use_gpu=None, candidates=100, shard=None, **unused) -> TagDatastore:
    """Merge tag shards (entries concatenated, tag vocabularies united in first-seen order)."""
    if root is None:
        from rcd.paths import cache_dir

        root = cache_dir("datastores")
    chunk_kw = dict(chunking=chunking, chunk_size=chunk_size, overlap=overlap, retriever=retriever, encoder=encoder,
                    max_chunks=max_chunks, key_dtype=key_dtype)
    chunker, enc, _, espec, spec, tf, ttf = _resolve(lm, corpus_ds, corpus_name, tag_field=tag_field,
                                                     title_field=title_field, shard=None, num_shards=None, **chunk_kw)
    folder, exists = _folder(root, corpus_name, enc, None, spec)
    if not exists:
        parts = []
        for i in range(int(num_shards)):
            sspec = _resolve(lm, corpus_ds, corpus_name, tag_field=tag_field, title_field=title_field, shard=i,
                             num_shards=num_shards, **chunk_kw)[4]
            parts.append(shards.require_shard(root, sspec, "tags", i, num_shards))
        timer = base.Timer()
        with base.atomic_folder(folder) as tmp:
            merge_chunk_folders([p / "entries" for p in parts], tmp / "entries", espec,
                                chunker_spec=chunker.spec(), retriever=retriever, encoder=enc, progress=progress,
                                lm=lm)
            tag_files = merge_tag_files(parts, tmp)
            base.write_manifest(tmp, _manifest(
                spec, tag_files, tf, ttf, timer, {"merged_from": [p.name for p in parts]}))
    return TagDatastore.load(folder, lm, encoder=enc, weighting=weighting, temperature=temperature,
                             max_tags=max_tags, index_factory=index_factory, metric=metric, nprobe=nprobe,
                             ef_search=ef_search, use_gpu=use_gpu, rrf_k=rrf_k, candidates=candidates,
                             progress=progress)


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
        o = np.asarray(base.open_array(p, m["entry_tag_offsets"]))
        ids = np.asarray(base.open_array(p, m["entry_tag_ids"]))
        counts = np.asarray(base.open_array(p, m["entry_tag_counts"]))
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
