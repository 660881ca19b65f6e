"""Sharded builds and their merge.

Shard i of n holds the contiguous corpus rows ``[i·R//n, (i+1)·R//n)`` (R rows in all): a
deterministic split that keeps row order, so concatenating shards 0..n-1 gives exactly the
entries of an unsharded build, in the same order, with the same ids. Each shard is built into its
own folder (its fingerprint includes (i, n)); a merge finds the n shard folders by recomputing
their fingerprints from the same config, refuses to run if one is missing (naming the command
that builds it), streams their arrays into the folder of the unsharded build (the unsharded
fingerprint, atomically) and rebuilds whatever is global (BM25 statistics, FAISS index).

Token datastores (``rcd.datastore.tokens``) shard the same way (``shard``/``num_shards`` select
the rows before the build); :func:`merge_token_shards` concatenates keys/values/positions.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from rcd.datastore import base

BLOCK = 65536


def check_shard(shard: Optional[int], num_shards: Optional[int]) -> Optional[tuple[int, int]]:
    """Validate ``shard``/``num_shards``; ``None`` for an unsharded build."""
    if shard is None and num_shards is None:
        return None
    if shard is None or num_shards is None:
        raise ValueError(f"shard={shard} num_shards={num_shards}: give both (shard i of n) or neither")
    shard, num_shards = int(shard), int(num_shards)
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard={shard} must satisfy 0 <= shard < num_shards={num_shards}")
    return shard, num_shards


def shard_rows(n_rows: int, shard: Optional[tuple[int, int]]) -> range:
    """Contiguous corpus rows of shard (i, n): [i·R//n, (i+1)·R//n); all rows when unsharded."""
    if shard is None:
        return range(n_rows)
    i, n = shard
    return range(i * n_rows // n, (i + 1) * n_rows // n)


def shard_label(corpus_name: str, shard: Optional[tuple[int, int]]) -> str:
    return corpus_name if shard is None else f"{corpus_name}-shard{shard[0]}of{shard[1]}"


def shard_corpus(corpus_ds, corpus_name: str, shard: Optional[int], num_shards: Optional[int]):
    """(rows of shard i of n as a dataset, corpus name tagged with the shard); unchanged if unsharded."""
    sh = check_shard(shard, num_shards)
    if sh is None:
        return corpus_ds, corpus_name
    return corpus_ds.select(shard_rows(len(corpus_ds), sh)), shard_label(corpus_name, sh)


def require_shard(root: Path, spec: dict, unit: str, i: int, n: int) -> Path:
    """The finished folder of shard i of n (found by its fingerprint) or a DatastoreError saying how to build it."""
    found = base.find_existing(root, base.fingerprint(spec))
    if found is None:
        raise base.DatastoreError(
            f"cannot merge: shard {i} of {n} of this {unit} datastore is not built under {root}. Build it with "
            f"`python -m rcd.build datastore={unit} datastore.shard={i} datastore.num_shards={n}` and the same "
            "other settings, then merge again.")
    return found


# --------------------------------------------------------------------------- streaming concatenation
def concat_array(parts: list[Path], key: str, tmp: Path, shift: Optional[list[int]] = None,
                 column: Optional[int] = None) -> dict:
    """Concatenate the array ``manifest[key]`` of each part folder into ``tmp`` (block by block).

    ``shift[j]`` is added to part j's values (to ``[:, column]`` only when ``column`` is given).
    """
    from rcd.datastore.chunks import NpyAppender

    specs = [base.read_manifest(p)[key] for p in parts]
    arrays = [base.open_array(p, s) for p, s in zip(parts, specs)]
    out = NpyAppender(tmp / specs[0]["file"], arrays[0].dtype, arrays[0].shape[1:])
    for j, a in enumerate(arrays):
        if a.shape[1:] != arrays[0].shape[1:] or a.dtype != arrays[0].dtype:
            raise base.DatastoreError(f"cannot merge {parts[j]}: {specs[0]['file']} is {a.shape[1:]}/{a.dtype}, "
                                      f"shard 0 has {arrays[0].shape[1:]}/{arrays[0].dtype}")
        for s in range(0, a.shape[0], BLOCK):
            blk = np.array(a[s:s + BLOCK])
            if shift is not None and shift[j]:
                if column is None:
                    blk += shift[j]
                else:
                    blk[:, column] += shift[j]
            out.append(blk)
    return out.close()


def concat_strings(parts: list[Path], key: str, tmp: Path) -> dict:
    """Concatenate string stores (``.bin`` + offsets) of the parts into ``tmp``."""
    from rcd.datastore.chunks import NpyAppender, Strings

    specs = [base.read_manifest(p)[key] for p in parts]
    name = specs[0]["bin"][: -len(".bin")]
    offsets = NpyAppender(tmp / f"{name}_offsets.npy", np.int64)
    offsets.append([0])
    pos = 0
    with open(tmp / f"{name}.bin", "wb") as out:
        for p, spec in zip(parts, specs):
            strings = Strings(p, spec)  # checks sizes
            with open(p / spec["bin"], "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
            off = np.asarray(strings.offsets, dtype=np.int64)
            offsets.append(off[1:] + pos)
            pos += int(off[-1])
    spec = offsets.close()
    return {"bin": f"{name}.bin", "offsets": spec, "count": spec["shape"][0] - 1, "bytes": pos}


def merge_entry_files(parts: list[Path], tmp: Path) -> dict:
    """Merge the entry files every chunk-based datastore has (texts, rows, spans, doc ids)."""
    manifests = [base.read_manifest(p) for p in parts]
    for a, b in zip(manifests, manifests[1:]):
        if a["rows"][1] != b["rows"][0]:
            raise base.DatastoreError(f"cannot merge: shards cover rows {a['rows']} and {b['rows']}, not contiguous")
    return {"size": sum(m["size"] for m in manifests), "rows": [manifests[0]["rows"][0], manifests[-1]["rows"][1]],
            "texts": concat_strings(parts, "texts", tmp), "doc_ids": concat_strings(parts, "doc_ids", tmp),
            "chunk_rows": concat_array(parts, "chunk_rows", tmp), "chunk_spans": concat_array(parts, "chunk_spans", tmp)}


# --------------------------------------------------------------------------- tokens
def merge_token_shards(lm, corpus_ds, corpus_name: str, root: Path, *, num_shards: int, layer="final",
                       max_tokens=None, window=512, stride=None, key_dtype="float16", index_factory="Flat",
                       metric="l2", nprobe=32, ef_search=128, use_gpu=None, shard=None, rerank=False,
                       index_ondisk=False, map_fn=None, **unused):
    """Merge token-datastore shards into the folder of the unsharded build (needs ``max_tokens=null``).

    With ``index_ondisk=true`` the index of the merged keys is an on-disk IVF index filled one block per
    shard (``map_fn``: in parallel, e.g. Ray tasks) and merged on disk, never whole in RAM."""
    from rcd.corpus import fingerprint as corpus_fingerprint
    from rcd.datastore.tokens import TokenDatastore

    if root is None:
        from rcd.paths import cache_dir

        root = cache_dir("datastores")
    if max_tokens is not None:
        raise ValueError("merging token shards needs datastore.max_tokens=null: a cap applies to each shard "
                         "separately, so the merge would differ from an unsharded build")
    stride = stride or window
    spec = TokenDatastore.spec(lm, corpus_name, corpus_fingerprint(corpus_ds), layer, max_tokens, window, stride,
                               key_dtype)
    fp = base.fingerprint(spec)
    folder = base.find_existing(root, fp)
    if folder is None:
        folder = Path(root) / base.folder_name("tokens", corpus_name, lm.name, fp)
        n = int(num_shards)
        parts, row_starts = [], []
        for i in range(n):
            sub, label = shard_corpus(corpus_ds, corpus_name, i, n)
            sspec = TokenDatastore.spec(lm, label, corpus_fingerprint(sub), layer, max_tokens, window, stride,
                                        key_dtype)
            parts.append(require_shard(root, sspec, "tokens", i, n))
            row_starts.append(shard_rows(len(corpus_ds), (i, n)).start)
        manifests = [base.read_manifest(p) for p in parts]
        timer = base.Timer()
        with base.atomic_folder(folder) as tmp:
            keys = concat_array(parts, "keys", tmp)
            values = concat_array(parts, "values", tmp)
            positions = concat_array(parts, "positions", tmp, shift=row_starts, column=0)
            total = keys["shape"][0]
            seconds = sum(m.get("build_seconds", 0) for m in manifests) + timer.seconds
            manifest = {
                "format": base.FORMAT, "unit": "tokens", "fingerprint": fp, "spec": spec,
                "model": base.model_identity(lm), "layer": str(layer), "size": total, "documents": len(corpus_ds),
                "window": window, "stride": stride, "keys": keys, "values": values, "positions": positions,
                "build_seconds": round(seconds, 2), "tokens_per_second": round(total / max(seconds, 1e-9), 1),
                "merged_from": [p.name for p in parts],
                "shard_key_starts": list(np.cumsum([0] + [m["size"] for m in manifests[:-1]]).tolist()),
            }
            base.write_manifest(tmp, manifest)
    return TokenDatastore.load(folder, lm, index_factory=index_factory, metric=metric, nprobe=nprobe,
                               ef_search=ef_search, use_gpu=use_gpu, rerank=rerank, index_ondisk=index_ondisk,
                               map_fn=map_fn)
