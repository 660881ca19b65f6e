"""The one template every datastore unit follows: config → plan → build or merge → load.

A unit (``tokens``, ``chunks``, ``tags``, ``latent``) is a :class:`Unit` subclass with

* ``Params`` — a dataclass of its config keys (``conf/datastore/<unit>.yaml``) and their defaults;
* ``plan(lm, corpus_ds, corpus_name, params, shard)`` — checks the config and returns a
  :class:`Plan`: the fingerprinted ``spec`` and the names of its folder;
* ``write(tmp, plan, params, lm, corpus_ds, progress)`` — writes the files and the manifest of a
  build into a fresh folder;
* ``merge(tmp, plan, parts, params, lm, progress)`` — the same from the finished shard folders
  ``parts`` (in order);
* ``load(folder, plan, params, lm, progress, **extra)`` — opens a finished folder.

The template owns what every unit shares (:meth:`Unit.build_or_load`, :meth:`Unit.merge_shards`):
finding the folder by fingerprint, building it atomically, finding the n shard folders of a
merge (refusing with the command that builds a missing one), and the shard checks. Shard i of n
is the contiguous corpus rows ``[i·R//n, (i+1)·R//n)`` (:mod:`rcd.datastore.shards`).

A unit module exposes ``UNIT = <Unit>()``, ``build_or_load = UNIT.build_or_load`` (what the
YAML's ``_target_`` names) and ``merge_shards = UNIT.merge_shards``.
"""
from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rcd.datastore import base
from rcd.datastore.index import IndexSpec
from rcd.datastore.shards import check_shard, require_shard
from rcd.datastore.storage import atomic_folder

log = logging.getLogger(__name__)

Shard = Optional[tuple[int, int]]


@dataclass
class UnitParams:
    """Config keys every unit has."""

    shard: Optional[int] = None
    num_shards: Optional[int] = None

    def index_spec(self, prefix: str = "") -> IndexSpec:
        """The FAISS index these params describe (``<prefix>index_factory``, ``<prefix>metric``, ...)."""
        d = IndexSpec()
        return IndexSpec(factory=str(getattr(self, f"{prefix}index_factory", d.factory)),
                         metric=str(getattr(self, f"{prefix}metric", d.metric)),
                         nprobe=getattr(self, "nprobe", d.nprobe), ef_search=getattr(self, "ef_search", d.ef_search),
                         use_gpu=getattr(self, "use_gpu", d.use_gpu), ondisk=bool(getattr(self, "index_ondisk", False)))


@dataclass
class Plan:
    """What a config resolves to: the fingerprinted ``spec``, the folder's corpus and model labels,
    the shard, and what the unit resolved on the way (chunker, encoder, corpus rows: ``parts``)."""

    spec: dict
    corpus: str
    label: str
    shard: Shard = None
    parts: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return base.fingerprint(self.spec)


class Unit(ABC):
    """A datastore unit: subclasses implement the four steps below (see the module docstring)."""

    name: str = ""
    Params: type = UnitParams

    # ---------------------------------------------------------------- what a unit implements
    @abstractmethod
    def plan(self, lm, corpus_ds, corpus_name: str, p, shard: Shard) -> Plan:
        """Check ``p`` and resolve it into the fingerprinted spec and folder names."""

    @abstractmethod
    def write(self, tmp: Path, plan: Plan, p, lm, corpus_ds, progress: bool) -> None:
        """Build into the fresh folder ``tmp`` (files and manifest)."""

    @abstractmethod
    def merge(self, tmp: Path, plan: Plan, parts: list[Path], p, lm, progress: bool) -> None:
        """Build into ``tmp`` from the finished shard folders ``parts`` (in order)."""

    @abstractmethod
    def load(self, folder: Path, plan: Plan, p, lm, progress: bool, **extra):
        """Open the finished folder."""

    def check_merge(self, p) -> None:
        """Refuse a config whose shards would not merge into the unsharded build."""

    def needs_model(self, p) -> bool:
        """Whether a build with params ``p`` runs or tokenizes with the LM (default: yes)."""
        return True

    # ---------------------------------------------------------------- shared
    def config_keys(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self.Params)}

    def params(self, cfg: dict[str, Any]):
        cfg = {k: v for k, v in cfg.items() if k not in ("unit", "_target_")}
        unknown = sorted(set(cfg) - self.config_keys())
        if unknown:
            raise TypeError(f"{unknown[0]!r} is not a parameter of the {self.name} datastore; its parameters: "
                            f"{sorted(self.config_keys())}")
        return self.Params(**cfg)

    def folder(self, root: Path, plan: Plan) -> tuple[Path, bool]:
        """The finished folder of ``plan`` under ``root`` (True) or where to build it (False)."""
        found = base.find_existing(root, plan.fingerprint)
        if found is not None:
            return found, True
        return Path(root) / base.folder_name(self.name, plan.corpus, plan.label, plan.fingerprint), False

    @staticmethod
    def _root(root) -> Path:
        if root is None:
            from rcd.paths import cache_dir

            return cache_dir("datastores")
        return Path(root)

    def build_or_load(self, lm, corpus_ds, corpus_name: str, root: Optional[Path] = None, *, progress: bool = True,
                      **cfg):
        """Reuse the datastore with this config's fingerprint under ``root`` or build it (shard
        ``shard`` of ``num_shards`` when both are set)."""
        p = self.params(cfg)
        root = self._root(root)
        if corpus_ds is None or len(corpus_ds) == 0:
            raise ValueError(f"corpus {corpus_name!r} is empty: nothing to build a datastore from")
        plan = self.plan(lm, corpus_ds, corpus_name, p, check_shard(p.shard, p.num_shards))
        folder, exists = self.folder(root, plan)
        if not exists:
            timer = base.Timer()
            with atomic_folder(folder) as tmp:
                self.write(tmp, plan, p, lm, corpus_ds, progress)
            log.info("built %s datastore %s in %.1fs", self.name, folder, timer.seconds)
        return self.load(folder, plan, p, lm, progress)

    def merge_shards(self, lm, corpus_ds, corpus_name: str, root: Optional[Path] = None, *, num_shards: int,
                     progress: bool = True, map_fn=None, **cfg):
        """Merge the ``num_shards`` finished shard folders of this config into the folder of the
        unsharded build (same fingerprint); ``map_fn`` runs an index's per-shard work in parallel
        where a unit has some (the on-disk IVF lists of the token unit)."""
        cfg.pop("shard", None)
        p = self.params(cfg)
        self.check_merge(p)
        root = self._root(root)
        n = int(num_shards)
        plan = self.plan(lm, corpus_ds, corpus_name, p, None)
        folder, exists = self.folder(root, plan)
        if not exists:
            parts = [require_shard(root, self.plan(lm, corpus_ds, corpus_name, p, (i, n)).spec, self.name, i, n)
                     for i in range(n)]
            timer = base.Timer()
            with atomic_folder(folder) as tmp:
                self.merge(tmp, plan, parts, p, lm, progress)
            log.info("merged %d shards into %s datastore %s in %.1fs", n, self.name, folder, timer.seconds)
        extra = {"map_fn": map_fn} if map_fn is not None else {}
        return self.load(folder, plan, p, lm, progress, **extra)
