"""Latent datastore: stored KV caches equal a fresh forward pass; memories; model checks; shards."""
import datasets
import numpy as np
import pytest
import torch

from conftest import TEXTS, as_loaded, tiny_llama
from rcd.compat import cache_kwargs, output_cache
from rcd.datastore import base
from rcd.datastore.latent import LatentDatastore, build_or_load, cache_layers, merge_shards


def corpus(texts=TEXTS):
    return datasets.Dataset.from_dict({"id": [f"t{i}" for i in range(len(texts))], "text": texts})


KW = dict(chunking="tokens", chunk_size=24, overlap=0, retriever="bm25", progress=False, batch_size=4)


def fresh_cache(lm, ids):
    with torch.no_grad():
        out = lm.model(ids.view(1, -1), use_cache=True)
    return cache_layers(output_cache(out))


def test_kv_cache_of_a_chunk_equals_a_fresh_forward_pass(tiny_lm, tmp_path):
    ds = build_or_load(tiny_lm, corpus(), "toy", tmp_path, kv_dtype="float32", **KW)
    assert len(ds) == sum(-(-len(t) // 24) for t in TEXTS)  # 1 char = 1 token, no overlap
    for i in [0, 3, len(ds) - 1]:
        # the chunk's text tokenizes to the stored ids (char tokenizer), and its cache is the model's
        ids = tiny_lm.tokenizer(ds.text(i), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        assert ids.tolist() == ds.tokens(i).tolist() and ds.length(i) == len(ids)
        want = fresh_cache(tiny_lm, ids)
        got = ds.kv([i])
        assert len(got) == len(want) == 2
        for (wk, wv), (gk, gv) in zip(want, got):
            assert gk.shape == wk.shape == (1, 2, len(ids), 8)
            torch.testing.assert_close(gk, wk, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(gv, wv, atol=1e-5, rtol=1e-5)


def test_fp16_caches_continue_generation_like_the_full_forward(tiny_lm, tmp_path):
    ds = build_or_load(tiny_lm, corpus(), "toy", tmp_path, **KW)
    assert ds.manifest["kv"]["dtype"] == "float16"
    i = 1
    chunk = ds.tokens(i)
    nxt = tiny_lm.tokenizer(" and so on", add_special_tokens=False, return_tensors="pt")["input_ids"]
    cache = ds.kv_cache([i])
    assert cache.get_seq_length() == len(chunk)
    with torch.no_grad():
        got = tiny_lm.model(nxt, **cache_kwargs(tiny_lm.model, cache)).logits
        want = tiny_lm.model(torch.cat([chunk.view(1, -1), nxt], 1)).logits[:, len(chunk):]
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
    # several chunks concatenate along the sequence, in order, -1 skipped
    two = ds.kv([0, -1, 2])
    assert two[0][0].shape[2] == ds.length(0) + ds.length(2)
    torch.testing.assert_close(two[0][0][0, :, :ds.length(0)], ds.kv([0])[0][0][0])
    torch.testing.assert_close(two[0][1][0, :, ds.length(0):], ds.kv([2])[0][1][0])


def test_memories_are_block_outputs_and_search_finds_them(tiny_lm, tmp_path):
    ds = build_or_load(tiny_lm, corpus(), "toy", tmp_path, memory_layer=0, memory_dtype="float32",
                       memory_metric="l2", **KW)
    i = 2
    with torch.no_grad():
        hs = tiny_lm.model(ds.tokens(i).view(1, -1), output_hidden_states=True).hidden_states
    s, e = int(ds.offsets[i]), int(ds.offsets[i + 1])
    np.testing.assert_allclose(np.asarray(ds.memory_keys[s:e]), hs[1][0].numpy(), atol=1e-5)  # block 0 output
    planted = [s + 3, e - 1]
    q = torch.from_numpy(np.asarray(ds.memory_keys[planted]).copy())
    scores, ids, values = ds.search_memories(q, k=3)
    assert ids[:, 0].tolist() == planted
    torch.testing.assert_close(scores[:, 0], torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(values[:, 0], q)
    assert values.shape == (2, 3, tiny_lm.hidden_size)
    assert ds.memory_chunk(ids[:, :1]).flatten().tolist() == [i, i]
    # memory m is token m of the flat token array
    assert [int(ds.tokens_flat[int(m)]) for m in ids[:, 0]] == [ds.tokens(i)[3].item(), ds.tokens(i)[-1].item()]


def test_separate_value_layer_and_kv_off(tiny_lm, tmp_path):
    ds = build_or_load(tiny_lm, corpus(), "toy", tmp_path, kv=False, memory_layer=0, memory_value_layer="final",
                       memory_dtype="float32", **KW)
    assert ds.manifest["kv"] is None and ds.manifest["memories"]["value_layer"] == "final"
    with torch.no_grad():
        out = tiny_lm.model(ds.tokens(0).view(1, -1), output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(ds.memory_values[:ds.length(0)]), out.hidden_states[-1][0].numpy(),
                               atol=1e-5)
    with pytest.raises(ValueError, match="without KV"):
        ds.kv([0])
    with pytest.raises(ValueError, match="hold nothing"):
        build_or_load(tiny_lm, corpus(), "toy", tmp_path, kv=False, memories=False, **KW)


def test_text_search_gives_ids_that_index_the_caches(tiny_lm, tmp_path):
    ds = build_or_load(tiny_lm, corpus(), "toy", tmp_path, **KW)
    i = next(j for j in range(len(ds)) if "outrageous" in ds.text(j))
    hits = ds.search(["outrageous"], k=2)
    assert hits.ids[0, 0].item() == i and hits.doc_ids[0][0] == "t1"
    assert ds.kv(hits.ids[0, :1])[0][0].shape[2] == ds.length(i)
    d = ds.describe()
    assert d["unit"] == "latent" and d["size"] == len(ds) and d["kv"] and d["memories"] and d["bytes"] > 0


def test_another_model_is_refused(tiny_lm, other_lm, tmp_path):
    ds = build_or_load(tiny_lm, corpus(), "toy", tmp_path, **KW)
    with pytest.raises(base.DatastoreError, match="hidden size 32 vs 48"):
        LatentDatastore.load(ds.folder, other_lm)
    # another model of the same shape gets its own folder (the fingerprint names the model)
    model, tok = tiny_llama(seed=3)
    again = build_or_load(as_loaded(model, tok, name="tiny-seed3"), corpus(), "toy", tmp_path, **KW)
    assert again.folder != ds.folder


def test_interrupted_latent_build_leaves_nothing(tiny_lm, tmp_path, monkeypatch):
    import rcd.datastore.latent as latent

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(latent, "write_latents", boom)
    with pytest.raises(KeyboardInterrupt):
        build_or_load(tiny_lm, corpus(), "toy", tmp_path, **KW)
    assert list(tmp_path.iterdir()) == []


def test_sharded_latent_merge_equals_unsharded(tiny_lm, tmp_path):
    texts = TEXTS + ["Ay, there's the rub;\nFor in that sleep of death what dreams may come\n"]
    full = build_or_load(tiny_lm, corpus(texts), "toy", tmp_path / "full", **KW)
    for i in range(2):
        build_or_load(tiny_lm, corpus(texts), "toy", tmp_path / "sh", shard=i, num_shards=2, **KW)
    merged = merge_shards(tiny_lm, corpus(texts), "toy", tmp_path / "sh", num_shards=2, **KW)
    assert merged.folder.name == full.folder.name and len(merged) == len(full)
    assert np.array_equal(np.asarray(merged.tokens_flat), np.asarray(full.tokens_flat))
    for a, b in zip(merged.kv_layers, full.kv_layers):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-3)
    q = torch.from_numpy(np.asarray(full.memory_keys[[5, 40]], np.float32))
    assert torch.equal(merged.search_memories(q, 4)[1], full.search_memories(q, 4)[1])
    assert torch.equal(merged.search(["sleep of death"], 3).ids, full.search(["sleep of death"], 3).ids)
