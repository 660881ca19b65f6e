"""Token datastore: keys are the model's hidden states, values the next tokens; checks on load."""
import json

import numpy as np
import pytest
import torch

from conftest import TEXTS, as_loaded, char_tokenizer, tiny_llama
from rcd.datastore import base
from rcd.datastore.tokens import TokenDatastore, build_or_load, plan_windows
import datasets


def corpus(texts=TEXTS):
    return datasets.Dataset.from_dict({"id": [str(i) for i in range(len(texts))], "text": texts})


def head_inputs(lm, text):
    """Hidden states that feed the LM head for a whole document (reference computation)."""
    ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    got = {}
    h = lm.model.get_output_embeddings().register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0]))
    with torch.no_grad():
        lm.model(ids)
    h.remove()
    return ids[0], got["x"][0]


def test_plan_windows_cover_each_position_once():
    plans, total = plan_windows([10, 4], window=4, stride=2, max_tokens=None)
    covered = [(d, p) for d, c, s, e in plans for p in range(s, e)]
    assert covered == [(0, p) for p in range(9)] + [(1, p) for p in range(3)]
    assert total == 12
    assert all(e - c <= 4 for d, c, s, e in plans)
    assert plan_windows([10], 4, 4, max_tokens=5)[1] == 5


def test_keys_equal_hidden_states_and_values_are_next_tokens(tiny_lm, tmp_path):
    ds = build_or_load(tiny_lm, corpus(), "toy", tmp_path, window=256, stride=256, key_dtype="float32",
                       max_tokens=None, progress=False)
    keys = np.asarray(ds.keys)
    vals = np.asarray(ds.values_np)
    w = 0
    for text in TEXTS:
        ids, hid = head_inputs(tiny_lm, text)
        n = len(ids) - 1
        np.testing.assert_allclose(keys[w:w + n], hid[:n].numpy(), atol=1e-5)
        assert vals[w:w + n].tolist() == ids[1:].tolist()
        w += n
    assert len(ds) == w


def test_search_finds_planted_entry(tiny_lm, tmp_path):
    ds = build_or_load(tiny_lm, corpus(), "toy", tmp_path, key_dtype="float32", max_tokens=None, progress=False)
    q = torch.from_numpy(np.asarray(ds.keys[[5, 40]]).copy())
    nb = ds.search(q, k=3)
    assert nb.ids[:, 0].tolist() == [5, 40]
    assert torch.allclose(nb.scores[:, 0], torch.zeros(2), atol=1e-4)
    assert nb.tokens[:, 0].tolist() == [int(ds.values_np[5]), int(ds.values_np[40])]


def test_same_fingerprint_is_reused_and_changes_make_new_folder(tiny_lm, tmp_path):
    a = build_or_load(tiny_lm, corpus(), "toy", tmp_path, progress=False)
    b = build_or_load(tiny_lm, corpus(), "toy", tmp_path, progress=False)
    assert a.folder == b.folder
    c = build_or_load(tiny_lm, corpus(TEXTS[:2]), "toy", tmp_path, progress=False)
    d = build_or_load(tiny_lm, corpus(), "toy", tmp_path, window=64, progress=False)
    assert len({a.folder, c.folder, d.folder}) == 3


def test_mismatched_model_is_refused(tiny_lm, other_lm, tmp_path):
    ds = build_or_load(tiny_lm, corpus(), "toy", tmp_path, progress=False)
    with pytest.raises(base.DatastoreError, match="hidden size 32 vs 48"):
        TokenDatastore.load(ds.folder, other_lm)
    # same hidden size, another tokenizer
    model, _ = tiny_llama()
    tok = char_tokenizer()
    tok.add_tokens(["<extra>"])
    with pytest.raises(base.DatastoreError, match="tokenizer"):
        TokenDatastore.load(ds.folder, as_loaded(model, tok, "tiny-other-tok"))


def test_interrupted_build_never_looks_finished(tiny_lm, tmp_path, monkeypatch):
    import rcd.datastore.tokens as tokens

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokens.base, "write_json_atomic", boom)
    with pytest.raises(KeyboardInterrupt):
        build_or_load(tiny_lm, corpus(), "toy", tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # temp folder removed, nothing renamed into place
    monkeypatch.undo()
    ds = build_or_load(tiny_lm, corpus(), "toy", tmp_path, progress=False)
    assert (ds.folder / "manifest.json").exists()


def test_stale_temp_folder_is_ignored_and_cleaned(tiny_lm, tmp_path):
    stale = tmp_path / ".building-tokens-x-999999999"
    stale.mkdir()
    (stale / "keys.npy").write_bytes(b"partial")
    build_or_load(tiny_lm, corpus(), "toy", tmp_path, progress=False)
    assert not stale.exists()


def test_corrupt_or_missing_files_are_reported(tiny_lm, tmp_path):
    ds = build_or_load(tiny_lm, corpus(), "toy", tmp_path, progress=False)
    folder = ds.folder
    keys = folder / "keys.npy"
    keys.write_bytes(keys.read_bytes()[:200])
    with pytest.raises(base.DatastoreError, match="corrupt|rebuild"):
        TokenDatastore.load(folder, tiny_lm)
    keys.unlink()
    with pytest.raises(base.DatastoreError, match="missing"):
        TokenDatastore.load(folder, tiny_lm)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(base.DatastoreError, match="corrupt"):
        TokenDatastore.load(folder, tiny_lm)
    (folder / "manifest.json").unlink()
    with pytest.raises(base.DatastoreError, match="not a finished datastore"):
        TokenDatastore.load(folder, tiny_lm)


def test_empty_corpus_is_refused(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        build_or_load(tiny_lm, corpus([]), "toy", tmp_path, progress=False)
    with pytest.raises(ValueError, match="empty"):
        build_or_load(tiny_lm, corpus(["a"]), "toy", tmp_path, progress=False)  # 1 token: no next token


def test_approximate_index_by_factory_string(tiny_lm, tmp_path):
    ds = build_or_load(tiny_lm, corpus(), "toy", tmp_path, key_dtype="float32", index_factory="HNSW8",
                       progress=False)
    assert (ds.folder / "index" / "HNSW8-l2.faiss").exists()
    q = torch.from_numpy(np.asarray(ds.keys[[7]]).copy())
    assert ds.search(q, 1).ids[0, 0].item() == 7
    with pytest.raises(ValueError, match="index_factory"):
        build_or_load(tiny_lm, corpus(), "toy", tmp_path, index_factory="NotAnIndex", progress=False)


def test_rerank_gives_exact_distances_for_compressed_index(tiny_lm, tmp_path):
    texts = TEXTS * 4
    approx = build_or_load(tiny_lm, corpus(texts), "toy", tmp_path, key_dtype="float32", index_factory="PQ4",
                           max_tokens=None, progress=False)
    exact = build_or_load(tiny_lm, corpus(texts), "toy", tmp_path, key_dtype="float32", index_factory="PQ4",
                          max_tokens=None, rerank=True, progress=False)
    q = torch.randn(3, 32)
    a, e = approx.search(q, 5), exact.search(q, 5)
    assert torch.equal(a.ids, e.ids)
    keys = np.asarray(exact.keys)
    ref = ((keys[e.ids.numpy()] - q.numpy()[:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(e.scores.numpy(), ref, rtol=1e-5)
    assert not np.allclose(a.scores.numpy(), ref, rtol=1e-3)  # PQ distances were approximate


def test_context_is_the_corpus_text_around_an_entry_within_its_document(tiny_lm, tmp_path):
    ds = build_or_load(tiny_lm, corpus(), "toy", tmp_path, window=256, stride=256, key_dtype="float32",
                       max_tokens=None, progress=False)
    docs = [tiny_lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    first_of_doc1 = len(docs[0]) - 1  # entry of doc 1, position 0
    # entry i keys position p (value: token p+1): 3 tokens up to and including p+1, then 2 more
    assert ds.context(10, 3, 2) == docs[0][9:14]
    assert ds.context(first_of_doc1, 3, 2) == docs[1][1:4]  # nothing before the document's start
    assert ds.context(first_of_doc1 - 1, 2, 5) == docs[0][-2:]  # nothing after its end
