"""Chunk datastore: chunking boundaries, dense/BM25/hybrid search, fingerprints, encoder checks, shards."""
import math

import datasets
import numpy as np
import pytest
import torch

from conftest import TEXTS, char_tokenizer
from rcd.datastore import base, chunks
from rcd.datastore.chunking import Chunker, sentence_chunks, sentence_spans, token_windows
from rcd.datastore.chunks import ChunkDatastore, build_or_load, merge_shards
from rcd.datastore.retrievers import rrf_fuse
from rcd.datastore.storage import NpyAppender

TOPICS = [
    "The cat sat on the warm windowsill, purring in the afternoon sun.",
    "Quarterly revenue of the bank rose by ten percent after the merger.",
    "The volcano erupted and molten lava flowed down the mountain side.",
    "She baked a chocolate cake with strawberries for the birthday party.",
    "The football team won the championship final in extra time.",
    "Photosynthesis lets green plants turn sunlight into chemical energy.",
]


def corpus(texts, ids=None, **cols):
    ids = ids or [f"doc-{i}" for i in range(len(texts))]
    return datasets.Dataset.from_dict({"id": ids, "text": texts, **cols})


class Tok:
    """A LoadedModel stand-in that only carries a tokenizer (for token chunking without a model)."""

    name = "chartok"
    device = torch.device("cpu")

    def __init__(self):
        self.tokenizer = char_tokenizer()


# ----------------------------------------------------------------------------- chunking
def test_token_windows_boundaries_and_overlap():
    assert token_windows(300, 128, 32) == [(0, 128), (96, 224), (192, 300)]
    assert token_windows(128, 128, 32) == [(0, 128)]
    assert token_windows(129, 128, 32) == [(0, 128), (96, 129)]
    assert token_windows(10, 4, 0) == [(0, 4), (4, 8), (8, 10)]
    assert token_windows(0, 4, 1) == []
    with pytest.raises(ValueError, match="overlap"):
        token_windows(10, 4, 4)


def test_token_chunks_are_exact_spans_of_the_text():
    tok = char_tokenizer()  # one token per character: spans are easy to check by hand
    ch = Chunker("tokens", chunk_size=10, overlap=3, tokenizer=tok)
    text = "abcdefghijklmnopqrstuvwxyz"  # 26 tokens -> [0,10) [7,17) [14,24) [21,26)
    got = ch.chunks([text, "xy"], first_row=5)
    assert [(c.row, c.start, c.end) for c in got] == [(5, 0, 10), (5, 7, 17), (5, 14, 24), (5, 21, 26), (6, 0, 2)]
    assert [c.text for c in got] == ["abcdefghij", "hijklmnopq", "opqrstuvwx", "vwxyz", "xy"]
    assert got[1].token_ids == tok(text[7:17], add_special_tokens=False)["input_ids"]


def test_sentence_splitting_and_packing():
    text = 'Hello there. How are you? I am "fine." Yes!\n\nMACBETH.\nInto the air\nand beyond'
    assert [text[s:e] for s, e in sentence_spans(text)] == [
        "Hello there.", "How are you?", 'I am "fine."', "Yes!", "MACBETH.", "Into the air\nand beyond"]
    # sentences of 2,3,3,1,1,5 words; at most 6 words per chunk, share <= 3 trailing words
    got = [text[s:e] for s, e in sentence_chunks(text, 6, 3)]
    assert got == ["Hello there. How are you?", 'How are you? I am "fine."', 'I am "fine." Yes!\n\nMACBETH.',
                   "MACBETH.\nInto the air\nand beyond"]
    assert [text[s:e] for s, e in sentence_chunks(text, 6, 0)] == [
        "Hello there. How are you?", 'I am "fine." Yes!\n\nMACBETH.', "Into the air\nand beyond"]
    # a sentence longer than the chunk size is cut at word boundaries
    assert [("a b c d e f g")[s:e] for s, e in sentence_chunks("a b c d e f g", 3, 0)] == ["a b c", "d e f", "g"]


def test_record_chunking_skips_blank_rows_and_needs_no_tokenizer():
    got = Chunker("record").chunks(["one", "  ", "two three"], first_row=0)
    assert [(c.row, c.text) for c in got] == [(0, "one"), (2, "two three")]
    with pytest.raises(ValueError, match="tokenizer"):
        Chunker("tokens", 8, 2)
    with pytest.raises(ValueError, match="chunking="):
        Chunker("paragraph")


def test_npy_appender_writes_memory_mappable_arrays(tmp_path):
    w = NpyAppender(tmp_path / "a.npy", np.float16, (3,))
    w.append(np.arange(6).reshape(2, 3))
    w.append(np.arange(6, 9).reshape(1, 3))
    spec = w.close()
    arr = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert spec == {"file": "a.npy", "shape": [3, 3], "dtype": "float16"}
    np.testing.assert_array_equal(arr, np.arange(9).reshape(3, 3))


# ----------------------------------------------------------------------------- search
def test_dense_search_finds_the_planted_passage(tmp_path):
    ds = build_or_load(None, corpus(TOPICS), "topics", tmp_path, chunking="record", retriever="dense",
                       progress=False)
    assert len(ds) == 6 and ds.text(2) == TOPICS[2] and ds.doc_id(2) == "doc-2"
    hits = ds.search(["a kitten resting by the window", "how do plants make energy from light",
                      "hot rock pouring out of an eruption"], k=2)
    assert hits.ids[:, 0].tolist() == [0, 5, 2]
    assert hits.doc_ids[1][0] == "doc-5" and hits.texts[2][0] == TOPICS[2]
    assert (hits.scores[:, 0] > hits.scores[:, 1]).all()
    # an entry's own text is its nearest neighbour with cosine 1
    own = ds.search([TOPICS[4]], k=1)
    assert own.ids.item() == 4 and own.scores.item() == pytest.approx(1.0, abs=1e-5)
    # search_vectors with the encoder's embeddings gives the same answer
    q = ds.encode(["a kitten resting by the window"])
    assert ds.search_vectors(q, 1).ids.item() == 0
    d = ds.describe()
    assert d["unit"] == "chunks" and d["size"] == 6 and d["retriever"] == "dense" and d["bytes"] > 0
    assert d["index"] == "IndexFlat" and d["folder"] == str(ds.folder)


def test_bm25_scores_match_the_formula(tmp_path):
    docs = ["apple banana", "apple cherry cherry", "durian"]
    ds = build_or_load(None, corpus(docs), "fruit", tmp_path, chunking="record", retriever="bm25", progress=False)
    hits = ds.search(["cherry", "nothing matches"], k=3)
    # idf = ln(1 + (3-1+.5)/(1+.5)); tf = 2, |d| = 3, avg|d| = 2, k1 = 1.5, b = .75
    want = math.log(1 + 2.5 / 1.5) * 2 / (2 + 1.5 * (0.25 + 0.75 * 3 / 2))
    assert hits.ids[0].tolist() == [1, -1, -1]
    assert hits.scores[0, 0].item() == pytest.approx(want, rel=1e-5)
    assert hits.ids[1].tolist() == [-1, -1, -1] and hits.texts[1] == ["", "", ""]
    assert torch.isinf(hits.scores[0, 1:]).all()
    with pytest.raises(ValueError, match="dense"):
        ds.search_vectors(torch.zeros(1, 384), 1)


def test_rrf_fusion_by_hand():
    dense = np.array([[1, 2, 3]])
    bm25 = np.array([[3, 1, -1]])
    ids, scores = rrf_fuse([dense, bm25], k=3, rrf_k=60)
    # 1: 1/61 + 1/62, 3: 1/63 + 1/61, 2: 1/62
    assert ids.tolist() == [[1, 3, 2]]
    np.testing.assert_allclose(scores[0], [1 / 61 + 1 / 62, 1 / 63 + 1 / 61, 1 / 62], rtol=1e-6)


def test_hybrid_search_fuses_dense_and_bm25(tmp_path):
    ds = build_or_load(None, corpus(TOPICS), "topics", tmp_path, chunking="record", retriever="hybrid", rrf_k=60,
                       progress=False)
    hits = ds.search(["chocolate cake for a birthday"], k=3)
    assert hits.ids[0, 0].item() == 3
    # rank 1 in both lists
    assert hits.scores[0, 0].item() == pytest.approx(2 / 61, rel=1e-6)
    # the same folder serves each part alone
    dense = ChunkDatastore.load(ds.folder, retriever="dense")
    bm25 = ChunkDatastore.load(ds.folder, retriever="bm25")
    q = ["molten lava from the volcano"]
    d_ids, _ = dense.search_ids(q, 6)
    b_ids, _ = bm25.search_ids(q, 6)
    want, _ = rrf_fuse([d_ids, b_ids], 3, 60)
    assert ds.search(q, 3).ids[0].tolist() == want[0].tolist()


def test_k_larger_than_datastore_pads_with_no_hits(tmp_path):
    ds = build_or_load(None, corpus(TOPICS[:2]), "two", tmp_path, chunking="record", retriever="dense",
                       progress=False)
    hits = ds.search(["cat"], k=4)
    assert hits.ids.shape == (1, 4) and hits.ids[0, 2:].tolist() == [-1, -1]
    assert hits.doc_ids[0][2:] == ["", ""]


def test_token_chunk_sizes_are_lm_tokens(tmp_path):
    lm = Tok()
    ds = build_or_load(lm, corpus(TEXTS), "toy", tmp_path, chunking="tokens", chunk_size=40, overlap=10,
                       retriever="bm25", progress=False)
    want = [t[s:e] for t in TEXTS for s, e in token_windows(len(t), 40, 10)]  # 1 char = 1 token
    assert [ds.text(i) for i in range(len(ds))] == want
    assert ds.doc_id(len(ds) - 1) == "doc-2"


# ----------------------------------------------------------------------------- fingerprints and checks
def test_same_config_reuses_folder_and_changes_make_new_ones(tmp_path):
    lm = Tok()
    kw = dict(chunking="tokens", chunk_size=40, overlap=10, retriever="bm25", progress=False)
    a = build_or_load(lm, corpus(TEXTS), "toy", tmp_path, **kw)
    assert build_or_load(lm, corpus(TEXTS), "toy", tmp_path, **kw).folder == a.folder
    b = build_or_load(lm, corpus(TEXTS[:2]), "toy", tmp_path, **kw)
    c = build_or_load(lm, corpus(TEXTS), "toy", tmp_path, **{**kw, "overlap": 5})
    d = build_or_load(lm, corpus(TEXTS), "toy", tmp_path, **{**kw, "retriever": "dense"})
    other_tok = Tok()
    other_tok.tokenizer.add_tokens(["<extra>"])
    e = build_or_load(other_tok, corpus(TEXTS), "toy", tmp_path, **kw)
    assert len({a.folder, b.folder, c.folder, d.folder, e.folder}) == 5


def tiny_encoder(tmp_path):
    """A random 1-layer BERT sentence encoder with MiniLM's vocabulary (another weights fingerprint)."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from rcd.datastore.encoders import resolve

    tok = AutoTokenizer.from_pretrained(resolve("minilm"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64)
    d = tmp_path / "tiny-encoder"
    BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    word = models.Transformer(str(d))
    return SentenceTransformer(modules=[word, models.Pooling(word.get_embedding_dimension())], device="cpu")


def test_another_encoder_is_refused(tmp_path):
    ds = build_or_load(None, corpus(TOPICS), "topics", tmp_path, chunking="record", retriever="dense",
                       progress=False)
    with pytest.raises(base.DatastoreError, match="built with encoder 'minilm'.*different spaces"):
        ChunkDatastore.load(ds.folder, encoder=tiny_encoder(tmp_path))
    with pytest.raises(base.DatastoreError, match="retriever='dense'"):
        ChunkDatastore.load(ds.folder, retriever="bm25")


def test_interrupted_build_never_looks_finished(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(chunks, "build_bm25", boom)
    with pytest.raises(KeyboardInterrupt):
        build_or_load(None, corpus(TOPICS), "topics", tmp_path, chunking="record", retriever="bm25", progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # a folder with the right name but no manifest (killed before the rename) is not reused
    ds = build_or_load(None, corpus(TOPICS), "topics", tmp_path, chunking="record", retriever="bm25", progress=False)
    (ds.folder / "manifest.json").unlink()
    with pytest.raises(base.DatastoreError, match="not a finished datastore"):
        ChunkDatastore.load(ds.folder)
    again = build_or_load(None, corpus(TOPICS), "topics", tmp_path, chunking="record", retriever="bm25",
                          progress=False)
    assert (again.folder / "manifest.json").exists() and again.search(["lava"], 1).ids.item() == 2


def test_empty_corpus_is_refused(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        build_or_load(None, corpus([]), "none", tmp_path, chunking="record", retriever="bm25", progress=False)
    with pytest.raises(ValueError, match="no chunks"):
        build_or_load(None, corpus(["   "]), "blank", tmp_path, chunking="record", retriever="bm25", progress=False)


# ----------------------------------------------------------------------------- shards
SHARD_TEXTS = TOPICS + TEXTS + ["Lava and ash covered the town.", "The striker scored twice in the final."]


def test_sharded_build_merged_equals_unsharded(tmp_path):
    lm = Tok()
    kw = dict(chunking="tokens", chunk_size=48, overlap=8, retriever="hybrid", progress=False)
    ds = corpus(SHARD_TEXTS)
    full = build_or_load(lm, ds, "mix", tmp_path / "full", **kw)
    sroot = tmp_path / "sharded"
    folders = [build_or_load(lm, ds, "mix", sroot, shard=i, num_shards=3, **kw).folder for i in range(3)]
    assert len(set(folders)) == 3 and all("shard" in f.name for f in folders)
    merged = merge_shards(lm, ds, "mix", sroot, num_shards=3, **kw)
    assert merged.folder.name == full.folder.name  # the unsharded fingerprint
    assert len(merged) == len(full)
    assert [merged.text(i) for i in range(len(full))] == [full.text(i) for i in range(len(full))]
    assert [merged.doc_id(i) for i in range(len(full))] == [full.doc_id(i) for i in range(len(full))]
    np.testing.assert_allclose(np.asarray(merged.embeddings), np.asarray(full.embeddings), atol=1e-5)
    queries = ["volcano lava", "a cat in the sun", "sea of troubles", "football final", "to sleep, to die"]
    a, b = full.search(queries, 5), merged.search(queries, 5)
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)
    for r in ("dense", "bm25"):
        x = ChunkDatastore.load(full.folder, retriever=r).search_ids(queries, 5)[0]
        y = ChunkDatastore.load(merged.folder, retriever=r).search_ids(queries, 5)[0]
        assert (x == y).all()
    # merging again reuses the merged folder
    assert merge_shards(lm, ds, "mix", sroot, num_shards=3, **kw).folder == merged.folder


def test_merge_with_a_missing_shard_says_which(tmp_path):
    ds = corpus(SHARD_TEXTS)
    kw = dict(chunking="record", retriever="bm25", progress=False)
    build_or_load(None, ds, "mix", tmp_path, shard=0, num_shards=2, **kw)
    with pytest.raises(base.DatastoreError, match="shard 1 of 2 .*datastore.shard=1 datastore.num_shards=2"):
        merge_shards(None, ds, "mix", tmp_path, num_shards=2, **kw)
    with pytest.raises(ValueError, match="shard=2"):
        build_or_load(None, ds, "mix", tmp_path, shard=2, num_shards=2, **kw)
    with pytest.raises(ValueError, match="max_chunks"):
        build_or_load(None, ds, "mix", tmp_path, shard=0, num_shards=2, max_chunks=3, **kw)


def test_approximate_index_and_fp16_embeddings(tmp_path):
    ds = build_or_load(None, corpus(TOPICS), "topics", tmp_path, chunking="record", retriever="dense",
                       index_factory="HNSW8", key_dtype="float16", progress=False)
    assert ds.embeddings.dtype == np.float16 and (ds.folder / "index" / "HNSW8-ip.faiss").exists()
    assert ds.search([TOPICS[3], "a kitten resting by the window"], 1).ids[:, 0].tolist() == [3, 0]
    assert "HNSW" in ds.describe()["index"]


def test_a_unit_of_your_own_runs_on_the_template(tmp_path, monkeypatch):
    """tests/fixtures/outside/title_unit.py: one class on rcd's unit template, found from its target."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from rcd.datastore import registry
    from rcd.errors import ConfigError
    from rcd.validate import check_datastore

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fixtures" / "outside"))
    import title_unit

    ds = corpus(TOPICS, title=[f"Topic {i}" for i in range(len(TOPICS))])
    store = title_unit.build_or_load(None, ds, "topics", tmp_path, retriever="bm25", progress=False)
    assert store.text(5) == "Topic 5: " + TOPICS[5] and store.folder.name.startswith("titled-topics-")
    assert int(store.search(["photosynthesis sunlight"], 1).ids[0, 0]) == 5
    again = title_unit.build_or_load(None, ds, "topics", tmp_path, retriever="bm25", progress=False)
    assert again.folder == store.folder  # reused by fingerprint
    node = {"_target_": "title_unit.build_or_load", "unit": "titled", "retriever": "bm25"}
    assert registry.unit_of(node) is title_unit.UNIT and not registry.needs_model(node)  # record chunks
    with pytest.raises(ConfigError, match="title_fild"):
        check_datastore(OmegaConf.create({**node, "title_fild": "x"}))
    with pytest.raises(TypeError, match="title_fild"):
        title_unit.build_or_load(None, ds, "topics", tmp_path, title_fild="x")
