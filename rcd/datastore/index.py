"""FAISS indexes chosen by ``index_factory`` string, stored next to the keys they index.

``Flat`` is exact search; ``IVF4096,PQ64``, ``HNSW32``, ``OPQ64,IVF1024,PQ64`` … are approximate.
Indexes that need training are trained on a random sample of the keys (fixed seed). Keys are
added in blocks read from the memory-mapped key file, so RAM stays bounded. On a machine with a
GPU and faiss-gpu, search runs on the GPU; otherwise on the CPU.

How an index is built and searched is one value, :class:`IndexSpec` (factory string, metric,
nprobe, efSearch, GPU, on-disk lists); a unit's config (``index_factory``, ``metric``, ``nprobe``,
``ef_search``, ``use_gpu``, ``index_ondisk``) becomes one with
:meth:`rcd.datastore.unit.UnitParams.index_spec`.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from rcd.datastore.base import Timer, sampled_sha1, slug
from rcd.datastore.storage import DatastoreError, process_tag

log = logging.getLogger(__name__)

METRICS = ("l2", "ip")


@dataclass(frozen=True)
class IndexSpec:
    """A FAISS index: ``factory`` string, ``metric`` (l2 | ip), search parameters (``nprobe`` for IVF,
    ``ef_search`` for HNSW), ``use_gpu`` (None = when faiss-gpu sees a GPU) and ``ondisk`` (IVF lists
    memory-mapped from disk, :mod:`rcd.datastore.ondisk`)."""

    factory: str = "Flat"
    metric: str = "l2"
    nprobe: Optional[int] = 32
    ef_search: Optional[int] = 128
    use_gpu: Optional[bool] = None
    ondisk: bool = False

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric={self.metric!r}: choose one of {', '.join(METRICS)}")


def _faiss():
    try:
        import faiss  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("faiss is not installed: pip install faiss-cpu (or faiss-gpu-cu12 on a GPU machine)") from e
    return faiss


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def index_path(folder: Path, factory: str, metric: str, ondisk: bool = False) -> Path:
    return Path(folder) / "index" / f"{slug(factory)}-{metric}{'-ondisk' if ondisk else ''}.faiss"


def trained_index(keys: np.ndarray, factory: str, metric: str = "l2", train_size: int = 100_000, seed: int = 0):
    """An empty FAISS index for ``keys`` [N, d], trained (when it needs training) on ``train_size``
    keys drawn with ``seed``: the same sample, hence the same quantizer, however the keys were built."""
    faiss = _faiss()
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: choose one of {METRICS}")
    n, d = keys.shape
    ftype = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    try:
        index = faiss.index_factory(d, factory, ftype)
    except RuntimeError as e:
        raise ValueError(f"index_factory={factory!r} is not a valid FAISS factory string for dimension {d}: {e}") from e
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        m = min(n, train_size)
        sample = np.sort(rng.choice(n, size=m, replace=False))
        xt = np.ascontiguousarray(keys[sample], dtype=np.float32)
        log.info("training %s on %d of %d keys", factory, m, n)
        try:
            index.train(xt)
        except RuntimeError as e:
            raise ValueError(f"could not train {factory!r} on {m} keys ({e}); "
                             "use a smaller index (fewer IVF lists) or a bigger datastore") from e
    return index


def build_index(keys: np.ndarray, factory: str, metric: str = "l2", train_size: int = 100_000,
                block: int = 65536, seed: int = 0, progress: bool = False):
    """Build a FAISS index over ``keys`` [N, d] (float16/float32, may be a memmap), in memory."""
    index = trained_index(keys, factory, metric, train_size, seed)
    n = keys.shape[0]
    it = range(0, n, block)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"index {factory}", unit="block")
    for s in it:
        index.add(np.ascontiguousarray(keys[s:s + block], dtype=np.float32))
    return index


def save_index(index, folder: Path, factory: str, metric: str, info: dict) -> Path:
    faiss = _faiss()
    path = index_path(folder, factory, metric)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{process_tag()}")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)
    meta = path.with_suffix(".json")
    tmpm = meta.with_name(meta.name + f".tmp-{process_tag()}")
    tmpm.write_text(json.dumps({"factory": factory, "metric": metric, "ntotal": int(index.ntotal),
                                "bytes": path.stat().st_size, "sampled": sampled_sha1(path), **info}, indent=2))
    os.replace(tmpm, meta)
    return path


def _index_intact(path: Path) -> bool:
    """Whether the index file matches the size and sampled checksum its .json recorded when saved."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        return meta.get("bytes") == path.stat().st_size and meta.get("sampled") == sampled_sha1(path)
    except (OSError, ValueError):
        return False


def load_or_build_index(folder: Path, keys: np.ndarray, spec: IndexSpec, *, progress: bool = False,
                        keys_spec: Optional[dict] = None, bounds=None, map_fn=None):
    """Open ``index/<factory>-<metric>.faiss`` (building it the first time) and set search params.

    ``spec.ondisk``: an IVF index whose inverted lists stay on disk (:mod:`rcd.datastore.ondisk`),
    filled block by block (``bounds``: row starts of shards, each its own block; ``map_fn`` fills the
    blocks in parallel), searched on the CPU through a memory map. Needs ``keys_spec`` (the manifest
    entry of the keys, so workers can reopen them)."""
    faiss = _faiss()
    from rcd.datastore import ondisk as od

    factory, metric, ondisk, use_gpu = spec.factory, spec.metric, spec.ondisk, spec.use_gpu
    path = index_path(folder, factory, metric, ondisk)
    intact = od.intact if ondisk else _index_intact
    if path.exists() and not intact(path):
        log.warning("%s does not match its recorded checksum (changed or half-written): rebuilding it", path)
        od.remove(path)
    if path.exists():
        if ondisk:
            index = od.read(path)
        else:
            try:
                index = faiss.read_index(str(path))
            except RuntimeError as e:
                raise DatastoreError(f"{path} is corrupt ({e}); delete it and it will be rebuilt") from e
        if index.ntotal != keys.shape[0] or index.d != keys.shape[1]:
            raise DatastoreError(f"{path} holds {index.ntotal}x{index.d} vectors but the keys are "
                                 f"{keys.shape[0]}x{keys.shape[1]}; delete it and it will be rebuilt")
    elif ondisk:
        if keys_spec is None:
            raise ValueError("an on-disk index needs keys_spec (the keys' manifest entry)")
        t = Timer()
        empty = trained_index(keys, factory, metric)
        od.check_factory(empty, factory)
        path.parent.mkdir(parents=True, exist_ok=True)
        od.build(od.StoredKeys(folder, keys_spec), empty, path, od.row_blocks(keys.shape[0], bounds), map_fn=map_fn,
                 info={"factory": factory, "metric": metric, "train_seconds": round(t.seconds, 2)})
        index = od.read(path)
    else:
        t = Timer()
        index = build_index(keys, factory, metric, progress=progress)
        save_index(index, folder, factory, metric, {"build_seconds": round(t.seconds, 2)})
    set_search_params(index, nprobe=spec.nprobe, ef_search=spec.ef_search)
    if use_gpu is None:
        use_gpu = gpu_available() and not ondisk  # on-disk lists are searched where they are: on the CPU
    if use_gpu and ondisk:
        raise ValueError("use_gpu=true with index_ondisk=true: an on-disk index is searched on the CPU; "
                         "set use_gpu=null (or false), or index_ondisk=false to copy the index to the GPU")
    if use_gpu:
        res = faiss.StandardGpuResources()
        co = faiss.GpuClonerOptions()
        co.useFloat16 = True
        index = faiss.index_cpu_to_gpu(res, 0, index, co)
        index._rcd_gpu_res = res  # keep the resources alive as long as the index
    return index


def set_search_params(index, nprobe: Optional[int] = None, ef_search: Optional[int] = None) -> None:
    faiss = _faiss()
    ps = faiss.ParameterSpace()
    if nprobe is not None:
        try:
            ps.set_index_parameter(index, "nprobe", int(nprobe))
        except RuntimeError:
            pass  # index has no IVF stage
    if ef_search is not None:
        try:
            ps.set_index_parameter(index, "efSearch", int(ef_search))
        except RuntimeError:
            pass  # index has no HNSW stage
