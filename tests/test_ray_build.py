"""Sharded token-datastore builds as Ray tasks (local Ray, 2 workers) with the index filled per shard
and merged on disk give the keys, values and neighbours of the unsharded in-memory build. Skipped when
Ray is not installed (pip install rcd[ray])."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install rcd[ray]")


def _config(tmp_path: Path, root: str, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="build", overrides=[
            f"model.name={tmp_path / 'model'}", "corpus=files", f"corpus.datastore.data_files={tmp_path / 'corpus.jsonl'}",
            "datastore=tokens", "datastore.max_tokens=null", "datastore.window=64", "datastore.stride=64", "datastore.batch_size=8",
            "datastore.index_factory='IVF8,Flat'", "datastore.nprobe=3", f"datastore_root={tmp_path / root}",
            "progress=false", *overrides])


def test_ray_sharded_build_with_on_disk_merge_equals_the_unsharded_build(tmp_path):
    import dataclasses

    from rcd import build as build_mod
    from rcd.datastore import registry
    from rcd.datastore.index import IndexSpec
    from rcd.models import load_model

    model, tok = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    words = "to be or not to be that is the question whether tis nobler in the mind".split()
    rows = [" ".join(words[(i * 5 + j * 3) % len(words)] for j in range(150)) for i in range(12)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))

    plain = build_mod.build(_config(tmp_path, "plain"))
    sharded = build_mod.build(_config(tmp_path, "ray", "datastore.index_ondisk=true", "+datastore.num_shards=2",
                                      "ray.enabled=true", "ray.num_cpus=2"))
    assert plain["status"] == "built" and sharded["status"] == "merged"
    assert [s["shard"] for s in sharded["shards"]] == [0, 1] and all(s["status"] == "built" for s in sharded["shards"])
    assert sharded["ray"]["cluster_cpus"] == 2 and sharded["entries"] == plain["entries"] > 1000
    assert Path(sharded["folder"]).name == Path(plain["folder"]).name  # the unsharded fingerprint
    assert sharded["describe"]["index_ondisk"] and not plain["describe"]["index_ondisk"]
    assert list((Path(sharded["folder"]) / "index").glob("*-ondisk.ivfdata"))

    lm = load_model(str(tmp_path / "model"), "cpu", "float32")
    spec = IndexSpec(factory="IVF8,Flat", metric="l2", nprobe=3)
    a = registry.open_datastore(Path(plain["folder"]), lm, index=spec)
    b = registry.open_datastore(Path(sharded["folder"]), lm, index=dataclasses.replace(spec, ondisk=True))
    assert np.array_equal(np.asarray(a.keys), np.asarray(b.keys)) and np.array_equal(a.values_np, b.values_np)
    import torch

    q = torch.from_numpy(np.asarray(a.keys[::23], dtype=np.float32))
    na, nb = a.search(q, 8), b.search(q, 8)
    assert torch.equal(na.ids, nb.ids) and torch.equal(na.scores, nb.scores) and torch.equal(na.tokens, nb.tokens)


def test_ray_build_refuses_a_config_without_shards(tmp_path):
    from rcd import build as build_mod
    from rcd.errors import ConfigError

    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": "a b c"}) + "\n")
    (tmp_path / "model").mkdir()
    with pytest.raises(ConfigError, match="ray.enabled: a Ray build runs shards as tasks"):
        build_mod.build(_config(tmp_path, "x", "ray.enabled=true"))
