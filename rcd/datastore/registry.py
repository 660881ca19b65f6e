"""The datastore units by name, the unit a config names, and opening any finished folder.

=========  ===================================  ==========================================
unit       module                               entry (what one search result is)
=========  ===================================  ==========================================
tokens     :mod:`rcd.datastore.tokens`          (hidden state at t, token t+1)  — kNN-LM
chunks     :mod:`rcd.datastore.chunks`          a passage (dense / BM25 / hybrid search)
tags       :mod:`rcd.datastore.tags`            labels of the nearest passages, weighted
latent     :mod:`rcd.datastore.latent`          a chunk's KV cache / per-token memories
=========  ===================================  ==========================================

Every unit module has ``UNIT`` (a :class:`rcd.datastore.unit.Unit`: config keys, plan, build,
merge, load), ``build_or_load(lm, corpus_ds, corpus_name, root, **cfg)`` (what
``conf/datastore/<unit>.yaml`` names as ``_target_``) and ``merge_shards`` (a merge of sharded builds).
A unit of your own needs no entry here: :func:`unit_of` finds it from its YAML's ``_target_``.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Mapping

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


def unit(name: str):
    """The :class:`rcd.datastore.unit.Unit` of ``name`` (its build, merge, config keys)."""
    _check(name)
    return importlib.import_module(UNITS[name][0]).UNIT


def unit_of(node: Mapping[str, Any]):
    """The :class:`~rcd.datastore.unit.Unit` a datastore config names: the owner of its ``_target_``
    (``<module>.build_or_load`` of any unit module, yours included), else the built-in ``unit``."""
    from hydra.utils import get_method

    from rcd.datastore.unit import Unit

    target = node.get("_target_")
    owner = getattr(get_method(target), "__self__", None) if target else None
    return owner if isinstance(owner, Unit) else unit(str(node.get("unit")))


def needs_model(node: Mapping[str, Any]) -> bool:
    """Whether building the datastore of config ``node`` needs the LM (tokens/latent, or LM-token chunking)."""
    u = unit_of(node)
    return u.needs_model(u.params(dict(node)))


def open_datastore(folder: Path, lm=None, **load_kwargs):
    """Open any finished datastore folder (its unit read from the manifest); ``load_kwargs`` go to the
    unit's ``load`` (e.g. ``index=IndexSpec(...)``)."""
    manifest = base.read_manifest(Path(folder))
    unit = manifest.get("unit")
    if unit not in UNITS:
        raise base.DatastoreError(f"{folder} holds an unknown datastore unit {unit!r}")
    if unit in ("tokens", "latent") and lm is None:
        raise ValueError(f"a {unit} datastore is opened with the model that built it: pass lm")
    return datastore_class(unit).load(Path(folder), lm, **load_kwargs)
