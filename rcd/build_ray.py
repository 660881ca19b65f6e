"""Sharded datastore builds as Ray tasks: ``python -m rcd.build ... datastore.num_shards=n ray.enabled=true``.

The driver validates the config, starts Ray (``ray.address=null``: a local Ray on this machine with
``ray.num_cpus`` CPUs; ``auto`` or ``ray://host:10001``: a running cluster, whose nodes have rcd
installed and see ``datastore_root`` on a shared filesystem), runs shard i of n as one task each
(``ray.cpus_per_shard`` CPUs and torch threads; every task loads the model and corpus itself and
builds through the same code as ``rcd.build datastore.shard=i``), then merges the shards into the
folder of the unsharded datastore. For token datastores with ``datastore.index_ondisk=true`` the
IVF index is filled one block per shard, also as Ray tasks, and merged on disk
(:mod:`rcd.datastore.ondisk`). Ray is an optional extra: ``pip install rcd[ray]``.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf, open_dict

from rcd.errors import ConfigError


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("ray.enabled", "Ray is not installed: pip install rcd[ray] (or set ray.enabled=false and "
                          "build shards with datastore.shard=i, then +merge=true)") from None
    return ray


def check(cfg: DictConfig) -> None:
    """Start-up checks of a Ray build (before Ray, a model or a datastore starts)."""
    r = cfg.get("ray") or {}
    ds = cfg.get("datastore") or {}
    if not ds.get("num_shards"):
        raise ConfigError("ray.enabled", "a Ray build runs shards as tasks: set datastore.num_shards=<n> "
                          "(+datastore.num_shards for the token unit)")
    if ds.get("shard") is not None:
        raise ConfigError("datastore.shard", "a Ray build runs every shard: leave datastore.shard unset")
    if cfg.get("merge"):
        raise ConfigError("merge", "a Ray build merges by itself: drop +merge=true")
    for key in ("cpus_per_shard", "num_cpus"):
        v = r.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
            raise ConfigError(f"ray.{key}", f"must be a positive number{' or null' if key == 'num_cpus' else ''}, got {v!r}")
    _ray()


@contextmanager
def session(address, num_cpus) -> Iterator[Any]:
    """Ray, started here (and stopped after) unless this process is connected already."""
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        kw = {"address": address} if address else {"num_cpus": int(num_cpus) if num_cpus else None}
        ray.init(include_dashboard=False, log_to_driver=True, **kw)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def ray_map(cpus: float) -> Callable:
    """``map_fn(fn, jobs)``: ``fn(*job)`` for every job as Ray tasks of ``cpus`` CPUs; results in order."""
    ray = _ray()

    def map_fn(fn, jobs):
        task = ray.remote(num_cpus=cpus)(fn)
        return ray.get([task.remote(*job) for job in jobs])

    return map_fn


def _build_shard(container: dict, i: int, threads: int) -> dict:
    """Shard ``i``: the same build ``rcd.build datastore.shard=i`` runs, in a Ray worker."""
    from rcd.build import build
    from rcd.run import set_threads

    set_threads(threads)
    cfg = OmegaConf.create(container)
    with open_dict(cfg):
        cfg.datastore.shard = i
        cfg.ray.enabled = False
        cfg.progress = False
    t0 = time.perf_counter()
    summary = build(cfg)
    summary.pop("describe", None)
    summary["task_seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def build_on_ray(cfg: DictConfig, merge_build: Callable) -> dict:
    """Run the n shards of ``cfg`` as Ray tasks, then ``merge_build(cfg_with_merge, map_fn)``; the merge's
    summary with ``shards`` (each shard's summary) and ``ray`` (address, CPUs, wall seconds) added."""
    check(cfg)
    r = cfg.ray
    n = int(cfg.datastore.num_shards)
    cpus = float(r.get("cpus_per_shard") or 1)
    container = OmegaConf.to_container(cfg, resolve=True)
    t0 = time.perf_counter()
    with session(r.get("address"), r.get("num_cpus")) as ray:
        total = ray.cluster_resources().get("CPU")
        shards = ray_map(cpus)(_build_shard, [(container, i, max(1, int(cpus))) for i in range(n)])
        t_shards = time.perf_counter() - t0
        merged = OmegaConf.create(container)
        with open_dict(merged):
            merged.merge = True
            merged.ray.enabled = False
        summary = merge_build(merged, ray_map(cpus))
    summary["shards"] = shards
    summary["ray"] = {"address": r.get("address") or "local", "cluster_cpus": total, "cpus_per_shard": cpus,
                      "shards_seconds": round(t_shards, 2), "wall_seconds": round(time.perf_counter() - t0, 2)}
    return summary
