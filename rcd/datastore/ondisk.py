"""IVF indexes whose inverted lists live on disk (``index_ondisk=true``), built without ever holding
the populated index in RAM.

FAISS's recipe (``faiss/contrib/ondisk.py``): train one empty IVF index (its coarse quantizer and
codec, on a sample of the keys); fill one copy of it per block of rows (``add_with_ids`` with the
global row ids) and write each block's index; then ``merge_ondisk`` concatenates the blocks'
inverted lists into one ``OnDiskInvertedLists`` file (``<name>.ivfdata``), which search reads
through a memory map. Resident memory is the quantizer plus one block; the page cache holds the
lists that queries touch.

Blocks are filled in row order and merged in row order, so every inverted list holds its entries in
the order an in-memory build adds them: same codes, same ids, same neighbours. The blocks can be
filled in parallel (``map_fn``: a Ray map when ``rcd.build ray.enabled=true``; one per shard).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from rcd.datastore.base import Timer, sampled_sha1
from rcd.datastore.storage import DatastoreError, open_array, process_tag

log = logging.getLogger(__name__)

#: rows per block when no shard boundaries are given (one block's codes are in RAM while it fills)
BLOCK_ROWS = 1_000_000
ADD_BLOCK = 65536


def check_factory(index, factory: str) -> None:
    """Refuse an index that cannot keep its lists on disk (not IVF, or with a refine stage)."""
    import faiss

    if faiss.try_extract_index_ivf(index) is None or "refine" in type(index).__name__.lower() or "+" in factory \
            or isinstance(index, faiss.IndexIVFPQR):
        raise ValueError(f"index_ondisk=true needs an IVF index without a refine stage (e.g. IVF4096,SQfp16 or "
                         f"IVF4096,PQ64; rerank=true re-scores hits from the stored keys instead), not {factory!r}")


def row_blocks(n: int, bounds: Optional[Sequence[int]] = None, block: Optional[int] = None) -> list[tuple[int, int]]:
    """Row ranges [start, end) covering 0..n: the given boundaries (shard starts), each cut to ``block``
    rows (default :data:`BLOCK_ROWS`)."""
    block = int(block or BLOCK_ROWS)
    starts = sorted(set([0] + [int(b) for b in (bounds or []) if 0 < int(b) < n]))
    out = []
    for a, b in zip(starts, starts[1:] + [n]):
        out += [(s, min(s + block, b)) for s in range(a, b, block)]
    return out


class StoredKeys:
    """The rows of a datastore's key file (picklable: a Ray task reopens the memory map)."""

    def __init__(self, folder, keys_spec: dict):
        self.folder, self.keys_spec, self._keys = str(folder), keys_spec, None

    def __getstate__(self):
        return {"folder": self.folder, "keys_spec": self.keys_spec, "_keys": None}

    def __call__(self, start: int, end: int) -> np.ndarray:
        if self._keys is None:
            self._keys = open_array(Path(self.folder), self.keys_spec)
        return self._keys[start:end]


def fill_block(rows: Callable[[int, int], np.ndarray], trained: str, start: int, end: int, out: str) -> str:
    """Add rows [start, end) of ``rows(s, e)`` (global ids) to a copy of the trained index at ``trained``
    and write it to ``out``. A plain function of picklable values: a Ray task runs it as well."""
    import faiss

    index = faiss.read_index(trained)
    for s in range(start, end, ADD_BLOCK):
        e = min(s + ADD_BLOCK, end)
        index.add_with_ids(np.ascontiguousarray(rows(s, e), dtype=np.float32), np.arange(s, e, dtype=np.int64))
    tmp = f"{out}.tmp-{process_tag()}"
    faiss.write_index(index, tmp)
    os.replace(tmp, out)
    return out


def build(rows: Callable[[int, int], np.ndarray], trained_index, path: Path, blocks: Iterable[tuple[int, int]],
          map_fn: Optional[Callable] = None, info: Optional[dict] = None) -> Path:
    """Write the on-disk index ``path`` (+ ``path.ivfdata`` and ``path.json``) of ``rows`` (e.g.
    :class:`StoredKeys`) from the empty ``trained_index``; ``map_fn(fill_block, args_list)`` fills the
    blocks (default: one after another, here)."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    t = Timer()
    work = path.parent / f".ondisk-{path.stem}-{process_tag()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        trained = work / "trained.faiss"
        faiss.write_index(trained_index, str(trained))
        blocks = list(blocks)
        jobs = [(rows, str(trained), a, b, str(work / f"block{j:05d}.faiss")) for j, (a, b) in enumerate(blocks)]
        files = []
        if map_fn is not None:
            files = list(map_fn(fill_block, jobs))
        else:
            for j in jobs:
                files.append(fill_block(*j))
                log.info("on-disk index %s: filled rows [%d, %d)", path.name, j[2], j[3])
        t_fill = t.seconds
        index = faiss.read_index(str(trained))
        ivfdata = work / (path.stem + ".ivfdata")  # its final name: read back relative to the index's folder
        merge_ondisk(index, files, str(ivfdata))
        faiss.write_index(index, str(work / path.name))
        ntotal = int(index.ntotal)
        del index
        os.replace(ivfdata, path.with_suffix(".ivfdata"))
        os.replace(work / path.name, path)
        meta = {"ntotal": ntotal, "bytes": path.stat().st_size, "sampled": sampled_sha1(path),
                "ivfdata_bytes": path.with_suffix(".ivfdata").stat().st_size,
                "ivfdata_sampled": sampled_sha1(path.with_suffix(".ivfdata")), "ondisk": True,
                "blocks": len(blocks), "fill_seconds": round(t_fill, 2), "build_seconds": round(t.seconds, 2),
                **(info or {})}
        tmpm = path.with_suffix(f".json.tmp-{process_tag()}")
        tmpm.write_text(json.dumps(meta, indent=2))
        os.replace(tmpm, path.with_suffix(".json"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def intact(path: Path) -> bool:
    """Whether the index (the in-memory index's check) and its lists match the sizes and sampled
    checksums recorded when written."""
    from rcd.datastore.index import _index_intact

    if not _index_intact(path):
        return False
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        data = path.with_suffix(".ivfdata")
        return meta.get("ivfdata_bytes") == data.stat().st_size and meta.get("ivfdata_sampled") == sampled_sha1(data)
    except (OSError, ValueError):
        return False


def read(path: Path):
    """Open an on-disk index; its lists are memory-mapped from ``<path>.ivfdata`` next to it."""
    import faiss

    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    except RuntimeError as e:
        raise DatastoreError(f"{path} is corrupt ({e}); delete it and its .ivfdata and it will be rebuilt") from e


def remove(path: Path) -> None:
    for p in (path, path.with_suffix(".ivfdata"), path.with_suffix(".json")):
        p.unlink(missing_ok=True)
