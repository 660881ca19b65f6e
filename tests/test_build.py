"""rcd.build: the Hydra app builds through the datastore configs, reports a summary, shards and merges."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import TEXTS
from rcd import build as build_mod
from rcd.datastore import registry

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

ROWS = TEXTS + ["Ay, there's the rub;\nFor in that sleep of death what dreams may come\n",
                "When we have shuffled off this mortal coil,\nMust give us pause.\n"]


def write_corpus(tmp_path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"row{i}", "text": t}) + "\n" for i, t in enumerate(ROWS)))
    return path


def config(tmp_path, *overrides):
    data = write_corpus(tmp_path)
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="build", overrides=[
            "corpus=files", f"corpus.datastore.data_files={data}", f"datastore_root={tmp_path / 'stores'}",
            "progress=false", *overrides])


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded but this build does not need it")

    monkeypatch.setattr("rcd.models.load_model", refuse)


@pytest.fixture
def tiny_model(monkeypatch, tiny_lm):
    monkeypatch.setattr("rcd.models.load_model", lambda *a, **k: tiny_lm)
    return tiny_lm


def test_build_summary_and_reuse(tmp_path, no_model):
    cfg = config(tmp_path, "datastore=chunks", "datastore.chunking=record", "datastore.retriever=bm25")
    s = build_mod.build(cfg)
    assert s["status"] == "built" and s["unit"] == "chunks" and s["entries"] == len(ROWS)
    assert s["bytes"] > 0 and s["index"] == "BM25(bm25s)" and s["peak_rss_mib"] > 10 and s["model"] is None
    assert s["peak_anon_mib"] is None or 0 < s["peak_anon_mib"] <= s["peak_rss_mib"] + 1
    text = build_mod.format_summary(s)
    assert "entries" in text and "peak RSS" in text and "(built)" in text
    again = build_mod.build(cfg)
    assert again["status"] == "reused" and again["folder"] == s["folder"]
    # the folder is the one rcd.run's path (call_target on the same node) finds
    store = registry.open_datastore(Path(s["folder"]))
    assert store.search(["mortal coil"], 1).doc_ids[0][0] == "row4"


def test_sharded_chunks_build_and_merge_through_the_cli_config(tmp_path, no_model):
    common = ["datastore=chunks", "datastore.chunking=sentence", "datastore.chunk_size=8", "datastore.overlap=2",
              "datastore.retriever=bm25"]
    full = build_mod.build(config(tmp_path / "a", *common))
    for i in range(2):
        s = build_mod.build(config(tmp_path / "b", *common, f"datastore.shard={i}", "datastore.num_shards=2"))
        assert s["status"] == "built" and f"shard{i}of2" in s["folder"]
    with pytest.raises(ValueError, match="num_shards"):
        build_mod.build(config(tmp_path / "b", *common, "+merge=true"))
    merged = build_mod.build(config(tmp_path / "b", *common, "+merge=true", "datastore.num_shards=2"))
    assert merged["status"] == "merged" and merged["entries"] == full["entries"]
    assert Path(merged["folder"]).name == Path(full["folder"]).name
    a = registry.open_datastore(Path(full["folder"]))
    b = registry.open_datastore(Path(merged["folder"]))
    q = ["sleep of death", "slings and arrows", "mortal coil pause"]
    assert torch.equal(a.search(q, 4).ids, b.search(q, 4).ids)


def test_token_datastore_shards_merge_to_the_unsharded_build(tmp_path, tiny_model):
    common = ["datastore=tokens", "datastore.max_tokens=null", "datastore.window=64", "datastore.stride=64",
              "datastore.key_dtype=float32"]
    full = build_mod.build(config(tmp_path / "a", *common))
    assert full["model"] == "tiny" and full["status"] == "built"
    for i in range(3):
        build_mod.build(config(tmp_path / "b", *common, f"+datastore.shard={i}", "+datastore.num_shards=3"))
    merged = build_mod.build(config(tmp_path / "b", *common, "+merge=true", "+datastore.num_shards=3"))
    assert Path(merged["folder"]).name == Path(full["folder"]).name and merged["entries"] == full["entries"]
    a = registry.open_datastore(Path(full["folder"]), tiny_model)
    b = registry.open_datastore(Path(merged["folder"]), tiny_model)
    np.testing.assert_allclose(np.asarray(a.keys), np.asarray(b.keys), atol=1e-5)
    assert np.array_equal(np.asarray(a.values_np), np.asarray(b.values_np))
    assert np.array_equal(np.load(a.folder / "positions.npy"), np.load(b.folder / "positions.npy"))
    q = torch.from_numpy(np.asarray(a.keys[[3, 50, 200]]).copy())
    assert torch.equal(a.search(q, 5).ids, b.search(q, 5).ids)


def test_latent_and_tags_build_through_the_app(tmp_path, tiny_model):
    s = build_mod.build(config(tmp_path, "datastore=latent", "datastore.retriever=bm25", "datastore.chunk_size=32"))
    assert s["unit"] == "latent" and s["entries"] == sum(-(-len(t) // 32) for t in ROWS)
    t = build_mod.build(config(tmp_path, "datastore=tags", "datastore.retriever=bm25"))
    assert t["unit"] == "tags" and t["model"] is None  # sentence chunking needs no LM
    assert registry.needs_model({"unit": "tags", "chunking": "tokens"})
    assert not registry.needs_model({"unit": "chunks", "chunking": "record"})
    assert registry.needs_model({"_target_": "rcd.datastore.latent.build_or_load", "unit": "chunks"})  # by its target


def test_corpus_configs_for_qa_passages_compose():
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        for name in ("wordnet", "mendeleev"):
            cfg = compose(config_name="build", overrides=[f"corpus={name}", "datastore=chunks"])
            assert cfg.corpus.name == name
            assert cfg.corpus.datastore.data_files == f"data/{name}_passages.jsonl"
            assert cfg.corpus.datastore.id_field == "id"
            assert cfg.datastore._target_ == "rcd.datastore.chunks.build_or_load"


def test_command_line(tmp_path):
    data = write_corpus(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "rcd.build", "datastore=chunks", "corpus=files", f"corpus.datastore.data_files={data}",
         "datastore.chunking=record", "datastore.retriever=bm25", f"datastore_root={tmp_path / 's'}", "progress=false",
         f"summary_json={tmp_path / 'summary.json'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[rcd.build] entries" in out.stdout and "(built)" in out.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["entries"] == len(ROWS)
    bad = subprocess.run([sys.executable, "-m", "rcd.build", "datastore=chunks", "corpus=files",
                          f"corpus.datastore.data_files={tmp_path / 'missing.jsonl'}", "datastore.chunking=record",
                          "datastore.retriever=bm25", f"datastore_root={tmp_path / 's'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 2 and "does not exist" in bad.stderr
