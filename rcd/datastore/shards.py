"""Shards: which corpus rows shard i of n holds, and finding the shard folders of a merge.

Shard i of n holds the contiguous corpus rows ``[i·R//n, (i+1)·R//n)`` (R rows in all): a
deterministic split that keeps row order, so concatenating shards 0..n-1 gives exactly the
entries of an unsharded build, in the same order, with the same ids. Each shard is built into its
own folder (its fingerprint includes (i, n)); a merge finds the n shard folders by recomputing
their fingerprints from the same config, refuses to run if one is missing (naming the command
that builds it), and each unit's ``merge`` streams their arrays into the folder of the unsharded
build (the unsharded fingerprint, atomically) and rebuilds whatever is global (BM25 statistics,
FAISS index); :class:`rcd.datastore.unit.Unit` runs these steps for every unit.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from rcd.datastore import base


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
# --------------------------------------------------------------------------- tokens
