"""What every datastore shares: fingerprinted folders, manifests, checksums, locks, model checks.

On disk a datastore is one folder ``<root>/<unit>-<corpus>-<model>-<fingerprint>``::

    manifest.json   format, unit, fingerprint, model/tokenizer identity, sizes, dtypes, files
    *.npy           keys / values / payload as (memory-mappable) .npy arrays
    index/<factory>.faiss + .json   one FAISS index per index_factory string

It is built in ``<root>/.building-<name>-<host>_<pid>`` (:func:`rcd.datastore.storage.atomic_folder`)
and renamed into place only after the manifest is written, so an interrupted build never looks
finished. Loading checks the manifest against the model in use and refuses a mismatch with a
message that says what differs.

Integrity: the manifest lists every file of the folder (``checksums``: bytes, SHA-1 of the whole
file, SHA-1 of 32 sampled 16 KiB blocks). Every load checks sizes and sampled blocks (a zeroed,
truncated or swapped array is refused; about 0.5 MiB read per file); ``python -m rcd.build ...
--verify`` re-hashes every byte. Folders of an older format (no checksums) are rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from rcd.datastore.storage import DatastoreError, write_json_atomic

FORMAT = "rcd-datastore/2"
SAMPLE_BLOCK = 16 * 1024
SAMPLE_BLOCKS = 32


def fingerprint(spec: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_")[:40] or "x"


def folder_name(unit: str, corpus: str, model: str, fp: str) -> str:
    return f"{unit}-{slug(corpus)}-{slug(Path(model).name)}-{fp}"


@contextmanager
def file_lock(path: Path, what: str = "") -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` for the block (released by the kernel if the process dies).
    Says so when it has to wait for another process."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[rcd] waiting for another process {what or 'holding ' + str(path)}", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_lock(root: Path, unit: str, corpus: str):
    """The lock two processes take before building or loading a ``unit`` datastore of ``corpus`` under
    ``root``: the second waits for the first's build and then finds (loads) its folder."""
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatastoreError(f"cannot use datastore folder {root} ({e.strerror}): set datastore_root=<a writable "
                             "folder> (or RCD_CACHE)") from None
    return file_lock(Path(root) / f".lock-{slug(unit)}-{slug(corpus)}",
                     f"to finish the {unit} datastore of {corpus!r} in {root}")


def sampled_sha1(path: Path, size: Optional[int] = None) -> str:
    """SHA-1 of the size and ``SAMPLE_BLOCKS`` blocks at evenly spaced offsets (first and last included)."""
    from rcd.identity import sha1_sampled

    return sha1_sampled(path, Path(path).stat().st_size if size is None else size, SAMPLE_BLOCK, SAMPLE_BLOCKS)


def _data_files(folder: Path) -> list[Path]:
    """Files a manifest vouches for: everything but the manifest and the lazily built ``index/``."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"
                  and p.relative_to(folder).parts[0] != "index")


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` with the checksums of every data file in ``folder`` (see module doc)."""
    from rcd.identity import sha1_file

    sums = {}
    for p in _data_files(folder):
        size = p.stat().st_size
        sums[p.relative_to(folder).as_posix()] = {"bytes": size, "sha1": sha1_file(p), "sampled": sampled_sha1(p, size)}
    write_json_atomic(folder / "manifest.json", {**manifest, "checksums": sums})


def verify_files(folder: Path, manifest: dict[str, Any], full: bool = False) -> int:
    """Check the folder's files against the manifest's checksums; returns the bytes read. Refuses any
    missing, extra-sized or changed file (``full``: every byte; else sizes and sampled blocks)."""
    from rcd.identity import sha1_file

    folder = Path(folder)
    sums = manifest.get("checksums")
    if not isinstance(sums, dict):
        raise DatastoreError(f"{folder}/manifest.json lists no checksums: the datastore cannot be verified; "
                             f"delete it (rm -r {folder}) and rebuild")
    read = 0
    for rel, want in sums.items():
        p = folder / rel
        if not p.is_file():
            raise DatastoreError(f"{p} is missing: the datastore is incomplete; delete {folder} and rebuild")
        size = p.stat().st_size
        if size != want["bytes"]:
            raise DatastoreError(f"{p} has {size:,} bytes, the manifest says {want['bytes']:,}: corrupt datastore; "
                                 f"delete {folder} and rebuild")
        got = sha1_file(p) if full else sampled_sha1(p, size)
        read += size if full else min(size, SAMPLE_BLOCK * SAMPLE_BLOCKS)
        if got != want["sha1" if full else "sampled"]:
            raise DatastoreError(f"{p} does not match its checksum in the manifest (changed after the build): "
                                 f"corrupt datastore; delete {folder} and rebuild")
    return read


def model_identity(lm) -> dict[str, Any]:
    """What a datastore records about the model that built it (and checks on load)."""
    from rcd.models import tokenizer_fingerprint

    return {
        "name": lm.name,
        "source": lm.source,
        "fingerprint": lm.fingerprint,
        "dtype": lm.dtype,
        "hidden_size": lm.hidden_size,
        "vocab_size": lm.vocab_size,
        "tokenizer": tokenizer_fingerprint(lm.tokenizer),
    }


def read_manifest(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DatastoreError(f"datastore folder {folder} does not exist; build it with `python -m rcd.build`")
    mpath = folder / "manifest.json"
    if not mpath.exists():
        raise DatastoreError(f"{folder} has no manifest.json: it is not a finished datastore (interrupted build?). "
                             f"Delete it (rm -r {folder}) and rebuild.")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise DatastoreError(f"{mpath} is corrupt ({e}); delete {folder} and rebuild") from e
    if manifest.get("format") != FORMAT:
        raise DatastoreError(f"{folder} has format {manifest.get('format')!r}, expected {FORMAT!r}; rebuild it")
    verify_files(folder, manifest, full=False)
    return manifest


def check_model(manifest: dict[str, Any], lm, folder: Path) -> None:
    """Refuse a datastore whose keys/values were made by a model incompatible with ``lm``."""
    built = manifest.get("model", {})
    now = model_identity(lm)
    problems = []
    if manifest.get("unit") in ("tokens", "latent") and built.get("hidden_size") != now["hidden_size"]:
        problems.append(f"hidden size {built.get('hidden_size')} vs {now['hidden_size']}")
    if built.get("vocab_size") != now["vocab_size"]:
        problems.append(f"vocabulary size {built.get('vocab_size')} vs {now['vocab_size']}")
    if manifest.get("unit") in ("tokens", "latent") and built.get("fingerprint") != now["fingerprint"]:
        problems.append(f"other weights (content fingerprint {built.get('fingerprint')} vs {now['fingerprint']})")
    if built.get("tokenizer") != now["tokenizer"]:
        problems.append("a different tokenizer (vocabulary hash "
                        f"{built.get('tokenizer')} vs {now['tokenizer']})")
    if problems:
        raise DatastoreError(
            f"datastore {folder} was built with model {built.get('name')!r} and cannot be used with "
            f"{lm.name!r}: {'; '.join(problems)}. Build a datastore for this model "
            f"(same command with model.name={lm.name}).")


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def find_existing(root: Path, fp: str) -> Optional[Path]:
    """The finished datastore folder with fingerprint ``fp`` under ``root`` (folders of an older
    format do not count: building anew replaces them)."""
    for p in Path(root).glob(f"*-{fp}"):
        try:
            if json.loads((p / "manifest.json").read_text()).get("format") == FORMAT:
                return p
        except (OSError, ValueError):
            continue
    return None


