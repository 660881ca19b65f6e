"""On-disk IVF indexes (``index_ondisk=true``): filled block by block, merged with FAISS's
``merge_ondisk`` into memory-mapped inverted lists; they return exactly the neighbours of the same
index built in memory. Bad combinations are refused at start-up."""
from __future__ import annotations

import numpy as np
import pytest

from rcd.datastore import index as index_mod
from rcd.datastore import ondisk
from rcd.datastore.index import IndexSpec
from rcd.datastore.storage import array_spec
from rcd.errors import ConfigError


@pytest.fixture
def keys_folder(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(24, 32)).astype(np.float32)
    keys = (centres[rng.integers(0, 24, 6000)] + 0.3 * rng.normal(size=(6000, 32))).astype(np.float16)
    np.save(tmp_path / "keys.npy", keys)
    return tmp_path, np.load(tmp_path / "keys.npy", mmap_mode="r"), array_spec("keys.npy", keys)


@pytest.mark.parametrize("factory,metric", [("IVF16,Flat", "l2"), ("IVF16,SQfp16", "ip"), ("IVF16,PQ8", "l2")])
def test_ondisk_index_returns_the_neighbours_of_the_in_memory_index(keys_folder, factory, metric, monkeypatch):
    folder, keys, spec = keys_folder
    monkeypatch.setattr(ondisk, "BLOCK_ROWS", 1000)  # 6000 rows: blocks cut at the shard start 2500 and every 1000
    mem = index_mod.load_or_build_index(folder, keys, IndexSpec(factory, metric, nprobe=4))
    calls = []
    disk = index_mod.load_or_build_index(folder, keys, IndexSpec(factory, metric, nprobe=4, ondisk=True), keys_spec=spec,
                                         bounds=[0, 2500], map_fn=lambda fn, jobs: [calls.append(j) or fn(*j) for j in jobs])
    assert [(j[2], j[3]) for j in calls] == [(0, 1000), (1000, 2000), (2000, 2500), (2500, 3500), (3500, 4500),
                                             (4500, 5500), (5500, 6000)]
    import faiss

    ivf = faiss.extract_index_ivf(disk)
    assert isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists) and disk.ntotal == 6000
    q = np.ascontiguousarray(keys[::37], dtype=np.float32)
    Dm, Im = mem.search(q, 10)
    Dd, Id = disk.search(q, 10)
    assert np.array_equal(Im, Id) and np.array_equal(Dm, Dd)
    path = index_mod.index_path(folder, factory, metric, ondisk=True)
    assert path.with_suffix(".ivfdata").stat().st_size > 0 and not list(path.parent.glob(".ondisk-*"))
    # reopened from disk (the lists file found next to the index, wherever the folder is)
    moved = folder.parent / f"{folder.name}-moved"
    folder.rename(moved)
    again = index_mod.load_or_build_index(moved, np.load(moved / "keys.npy", mmap_mode="r"),
                                          IndexSpec(factory, metric, nprobe=4, ondisk=True), keys_spec=spec)
    assert np.array_equal(again.search(q, 10)[1], Im)


def test_a_changed_lists_file_is_rebuilt(keys_folder):
    folder, keys, spec = keys_folder
    idx = index_mod.load_or_build_index(folder, keys, IndexSpec("IVF8,Flat", "l2", ondisk=True), keys_spec=spec)
    want = idx.search(np.ascontiguousarray(keys[:5], dtype=np.float32), 3)[1]
    del idx
    path = index_mod.index_path(folder, "IVF8,Flat", "l2", ondisk=True)
    data = path.with_suffix(".ivfdata")
    raw = bytearray(data.read_bytes())
    raw[:64] = bytes(64)
    data.write_bytes(bytes(raw))
    assert not ondisk.intact(path)
    idx = index_mod.load_or_build_index(folder, keys, IndexSpec("IVF8,Flat", "l2", ondisk=True), keys_spec=spec)
    assert ondisk.intact(path) and np.array_equal(idx.search(np.ascontiguousarray(keys[:5], dtype=np.float32), 3)[1], want)


def test_row_blocks_cut_at_shard_starts():
    assert ondisk.row_blocks(10, [0, 4], block=3) == [(0, 3), (3, 4), (4, 7), (7, 10)]
    assert ondisk.row_blocks(5, None, block=10) == [(0, 5)]


@pytest.mark.parametrize("overrides,key,msg", [
    (["datastore.index_ondisk=true"], "datastore.index_ondisk", "needs an IVF index_factory"),
    (["datastore.index_ondisk=true", "datastore.index_factory='IVF64,PQ8+rerank'"], "datastore.index_ondisk", "refine"),
    (["datastore.index_ondisk=true", "datastore.index_factory='IVF64,Flat'", "+datastore.use_gpu=true"],
     "datastore.index_ondisk", "searched on the CPU"),
    (["datastore.index_ondisk=1"], "datastore.index_ondisk", "must be true or false"),
])
def test_ondisk_settings_refused_at_start_up(overrides, key, msg):
    from rcd.paper.experiments import compose
    from rcd.validate import check_config

    cfg = compose(["+strategy=per_token"] + overrides)
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    assert str(e.value).startswith(key) and msg in str(e.value)
