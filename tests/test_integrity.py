"""Datastore checksums, content fingerprints and the n-gram leak check, against hand-made cases."""
from __future__ import annotations

import json
import os

import datasets
import numpy as np
import pytest

from rcd.datastore import base
from rcd.identity import file_fingerprint, folder_fingerprint
from rcd.leakage import LeakError, check_disjoint, ngram_overlap, words


def _folder(tmp_path, size=2 * 2 ** 20):
    d = tmp_path / "store"
    d.mkdir()
    rng = np.random.default_rng(0)
    (d / "keys.bin").write_bytes(rng.integers(0, 255, size, dtype=np.uint8).tobytes())
    (d / "small.json").write_text("{}")
    base.write_manifest(d, {"format": base.FORMAT, "unit": "tokens"})
    return d


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_manifest_checksums_sampled_on_load_and_full_with_verify(tmp_path):
    d = _folder(tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    assert set(m["checksums"]) == {"keys.bin", "small.json"}
    assert base.verify_files(d, m) == base.SAMPLE_BLOCK * base.SAMPLE_BLOCKS + 2  # sampled read: 0.5 MiB + small file
    assert base.verify_files(d, m, full=True) == 2 * 2 ** 20 + 2
    # a byte between two sampled blocks: only the full verification sees it
    size = (d / "keys.bin").stat().st_size
    gap = (size - base.SAMPLE_BLOCK) // (base.SAMPLE_BLOCKS - 1)
    _flip(d / "keys.bin", base.SAMPLE_BLOCK + gap // 2)
    base.verify_files(d, m)
    with pytest.raises(base.DatastoreError, match="keys.bin does not match its checksum"):
        base.verify_files(d, m, full=True)
    # a byte in a sampled block (the first): every load sees it
    _flip(d / "keys.bin", 10)
    with pytest.raises(base.DatastoreError, match="keys.bin does not match its checksum"):
        base.read_manifest(d)
    _flip(d / "keys.bin", 10)
    _flip(d / "keys.bin", base.SAMPLE_BLOCK + gap // 2)  # restored
    base.verify_files(d, m, full=True)
    (d / "small.json").write_text("{} ")
    with pytest.raises(base.DatastoreError, match="small.json has 3 bytes, the manifest says 2"):
        base.verify_files(d, m)
    (d / "small.json").unlink()
    with pytest.raises(base.DatastoreError, match="small.json is missing"):
        base.verify_files(d, m)


def test_old_format_folders_are_not_found_and_manifests_without_checksums_refused(tmp_path):
    d = tmp_path / "tokens-x-m-abc"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"format": "rcd-datastore/1"}))
    assert base.find_existing(tmp_path, "abc") is None  # rebuilt, not reused
    (d / "manifest.json").write_text(json.dumps({"format": base.FORMAT}))
    assert base.find_existing(tmp_path, "abc") == d
    with pytest.raises(base.DatastoreError, match="lists no checksums"):
        base.read_manifest(d)


def test_rcd_build_verify_reads_every_byte(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from rcd.build import _flags, build

    assert _flags(["datastore=tags", "--verify"]) == ["datastore=tags", "verify=true"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Sentence {i} about the king. Another one {i}."}) + "\n"
                              for i in range(20)))
    conf = os.path.join(os.path.dirname(__file__), "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base=None):
        cfg = compose(config_name="build", overrides=[
            "datastore=tags", "datastore.retriever=bm25", "corpus=files", f"corpus.datastore.data_files={corpus}",
            f"corpus.heldout.data_files={corpus}", f"datastore_root={tmp_path / 'ds'}", "progress=false",
            "verify=true"])
    s = build(cfg)
    assert s["verified"]["bytes"] == sum(p.stat().st_size for p in (tmp_path / "ds").rglob("*")
                                         if p.is_file() and p.name != "manifest.json" and "index" not in p.parts)


def test_index_file_changed_after_saving_is_rebuilt(tmp_path):
    from rcd.datastore.index import IndexSpec, index_path, load_or_build_index

    keys = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    load_or_build_index(tmp_path, keys, IndexSpec("Flat", "l2"))
    path = index_path(tmp_path, "Flat", "l2")
    _flip(path, path.stat().st_size - 5)
    index = load_or_build_index(tmp_path, keys, IndexSpec("Flat", "l2"))  # rebuilt from the keys, not read corrupt
    D, I = index.search(keys[:3], 1)
    assert I[:, 0].tolist() == [0, 1, 2]


def test_file_fingerprints_follow_content_not_path(tmp_path, monkeypatch):
    a = tmp_path / "a.txt"
    a.write_text("hello")
    b = tmp_path / "sub" / "b.txt"
    b.parent.mkdir()
    b.write_text("hello")
    assert file_fingerprint(a) == file_fingerprint(b)
    a.write_text("hellp")
    assert file_fingerprint(a) != file_fingerprint(b)
    assert file_fingerprint(a, detail=True)["method"] == "full"
    monkeypatch.setenv("RCD_FULL_HASH_BYTES", "4")
    c = tmp_path / "c.txt"
    c.write_text("x" * 100)
    assert file_fingerprint(c, detail=True)["method"] == "sampled"
    f1 = folder_fingerprint(tmp_path / "sub")
    (tmp_path / "sub" / "b.txt").write_text("other")
    assert folder_fingerprint(tmp_path / "sub") != f1


def _ds(*texts, ids=None):
    return datasets.Dataset.from_dict({"id": ids or [str(i) for i in range(len(texts))], "text": list(texts)})


def test_ngram_overlap_is_robust_to_reflow_case_and_punctuation():
    text = ("So foul and fair a day I have not seen. Speak, if you can: what are you? "
            "All hail, Macbeth! hail to thee, Thane of Glamis!")
    w = words(text)
    assert w[:4] == ["so", "foul", "and", "fair"] and "macbeth" in w
    reflowed = "SO FOUL and fair a day\n   I have not seen -- speak if you can;\nWhat are you All hail Macbeth hail to thee\n" \
               "thane of glamis"
    ov = ngram_overlap(_ds("unrelated words here", reflowed, ids=["x", "copy"]), _ds(text, ids=["held"]), 13)
    n = len(w) - 12
    assert ov.heldout_ngrams == n and ov.shared == n and ov.rate == 1.0
    assert ov.documents[0]["heldout"] == "held" and ov.documents[0]["datastore_documents"][0]["id"] == "copy"
    half = " ".join(w[: len(w) // 2])
    ov = ngram_overlap(_ds(half), _ds(text), 13)
    assert ov.shared == len(w) // 2 - 12  # the n-grams fully inside the copied half


def test_check_disjoint_names_the_documents_and_passes_under_the_limit():
    held = _ds("one two three four five six seven eight nine ten eleven twelve thirteen fourteen", ids=["play"])
    store = _ds("ONE two, three four five six seven eight nine ten eleven twelve thirteen", ids=["copy"])
    with pytest.raises(LeakError, match=r"50\.0% of its 13-grams .* held-out 'play' .* 'copy'"):
        check_disjoint(store, held, ngram=13, max_overlap=0.01)
    summary = check_disjoint(store, held, ngram=13, max_overlap=0.5)
    assert summary["overlap"] == 0.5 and summary["shared_ngrams"] == 1
