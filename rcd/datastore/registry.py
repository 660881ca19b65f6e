"""The datastore units by name: their modules, classes, merge functions, and opening any folder.

=========  ===================================  ==========================================
unit       module                               entry (what one search result is)
=========  ===================================  ==========================================
tokens     :mod:`rcd.datastore.tokens`          (hidden state at t, token t+1)  — kNN-LM
chunks     :mod:`rcd.datastore.chunks`          a passage (dense / BM25 / hybrid search)
tags       :mod:`rcd.datastore.tags`            labels of the nearest passages, weighted
latent     :mod:`rcd.datastore.latent`          a chunk's KV cache / per-token memories
=========  ===================================  ==========================================

Every unit has ``build_or_load(lm, corpus_ds, corpus_name, root, **cfg)`` (what
``conf/datastore/<unit>.yaml`` names as ``_target_``) and a merge of sharded builds.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Mapping

from rcd.datastore import base

UNITS = {
    "tokens": ("rcd.datastore.tokens", "TokenDatastore"),
    "chunks": ("rcd.datastore.chunks", "ChunkDatastore"),
    "tags": ("rcd.datastore.tags", "TagDatastore"),
    "latent": ("rcd.datastore.latent", "LatentDatastore"),
}


def _check(unit: str) -> None:
    if unit not in UNITS:
        raise ValueError(f"unknown datastore unit {unit!r}; choose one of {', '.join(UNITS)}")


def datastore_class(unit: str):
    _check(unit)
    mod, cls = UNITS[unit]
    return getattr(importlib.import_module(mod), cls)


def merge_function(unit: str) -> Callable:
    """``merge(lm, corpus_ds, corpus_name, root, *, num_shards, **cfg)`` for ``unit``."""
    _check(unit)
    if unit == "tokens":
        from rcd.datastore.shards import merge_token_shards

        return merge_token_shards
    return importlib.import_module(UNITS[unit][0]).merge_shards


def needs_model(unit: str, cfg: Mapping[str, Any]) -> bool:
    """Whether building ``unit`` with config ``cfg`` needs the LM (tokens/latent, or LM-token chunking)."""
    _check(unit)
    if unit in ("tokens", "latent"):
        return True
    return cfg.get("chunking", "tokens" if unit == "chunks" else "sentence") == "tokens"


def open_datastore(folder: Path, lm=None, **load_kwargs):
    """Open any finished datastore folder (its unit read from the manifest)."""
    manifest = base.read_manifest(Path(folder))
    unit = manifest.get("unit")
    if unit not in UNITS:
        raise base.DatastoreError(f"{folder} holds an unknown datastore unit {unit!r}")
    if unit in ("tokens", "latent") and lm is None:
        raise ValueError(f"a {unit} datastore is opened with the model that built it: pass lm")
    return datastore_class(unit).load(Path(folder), lm, **load_kwargs)
