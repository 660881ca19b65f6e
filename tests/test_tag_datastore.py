"""Tag datastore: the extractor on fixed texts, tag columns, weighted aggregation, token ids, shards."""
import math

import datasets
import numpy as np
import pytest

from conftest import char_tokenizer
from rcd.datastore import base
from rcd.datastore.tag_extract import extract_tags, head_lemmas
from rcd.datastore.tags import TagDatastore, build_or_load, merge_shards, tag_token_ids

PLAY = """ACT I.

SCENE 1. Rousillon.  A room in the COUNTESS'S palace.

[Enter BERTRAM, the COUNTESS OF ROUSILLON, HELENA, and LAFEU, all
in black.]

COUNTESS.
In delivering my son from me, I bury a second husband.

FIRST WITCH.
When shall we three meet again? Thane of Cawdor lives. Macbeth
The news came from Rome, and Duncan heard. O, I'll go with Sir Toby.
"""


def test_extractor_on_a_play():
    assert dict(extract_tags(PLAY, at_row_start=False)) == {
        "COUNTESS": 2,               # speaker line + the possessive COUNTESS'S
        "FIRST WITCH": 1,            # speaker line
        "BERTRAM": 1, "COUNTESS OF ROUSILLON": 1, "HELENA": 1, "LAFEU": 1,  # stage direction
        "Cawdor": 1,                 # "Thane" opens a sentence, "of" is trimmed
        "Rome": 1, "Duncan": 1, "Sir Toby": 1,  # mid-sentence names; "O", "I'll" are not names
    }
    assert dict(extract_tags("MRS. FORD.\nCome hither, MRS. PAGE.", at_row_start=False)) == {
        "MRS. FORD": 1, "MRS. PAGE": 1}
    # a sentence-opening word counts when it is a known name of the entry
    assert extract_tags("MACBETH.\nSo foul a day.\n\nBANQUO.\nMacbeth comes.", at_row_start=False) == {
        "MACBETH": 1, "BANQUO": 1, "Macbeth": 1}


def test_extractor_on_wordnet_glosses():
    aalto = "Aalto, Alvar Aalto, Hugo Alvar Henrik Aalto: Finnish architect and designer of furniture (1898-1976)"
    assert dict(extract_tags(aalto, title="Aalto")) == {
        "Aalto": 1, "Alvar Aalto": 1, "Hugo Alvar Henrik Aalto": 1, "Finnish": 1, "1898": 1, "1976": 1}
    plato = "Plato: ancient Athenian philosopher; pupil of Socrates; teacher of Aristotle (428-347 BC)"
    assert dict(extract_tags(plato, title="Plato")) == {
        "Plato": 1, "Athenian": 1, "Socrates": 1, "Aristotle": 1, "428": 1, "347": 1}
    assert dict(extract_tags("writer: a person who is able to write and has written something")) == {"writer": 1}
    # a verse line ending in a colon is not a head
    assert head_lemmas("To be, or not to be, that is the question:\nWhether 'tis nobler") == []
    # with a title, the head must contain it
    assert head_lemmas("Here lies: a man", title="Aalto") == []


def test_tag_token_ids_with_and_without_space():
    tok = char_tokenizer()
    plain, spaced = tag_token_ids(tok, "Ab")
    assert plain == [tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("b")]
    assert spaced == [tok.convert_tokens_to_ids(" ")] + plain


def corpus(texts, **cols):
    return datasets.Dataset.from_dict({"id": [f"r{i}" for i in range(len(texts))], "text": texts, **cols})


GLOSSES = [
    "Aalto, Alvar Aalto: Finnish architect and designer of furniture (1898-1976)",
    "Abel, Niels Abel: Norwegian mathematician (1802-1829)",
    "Plato: ancient Athenian philosopher; pupil of Socrates; teacher of Aristotle (428-347 BC)",
    "volcano: a fissure in the earth's crust through which molten lava and gases erupt",
]


def test_search_returns_tags_of_the_planted_entry(tmp_path):
    ds = build_or_load(None, corpus(GLOSSES, title=["Aalto", "Abel", "Plato", "volcano"]), "gloss", tmp_path,
                       chunking="record", retriever="bm25", weighting="softmax", progress=False)
    assert ds.entry_tags(1) == {"Abel": 1.0, "Niels Abel": 1.0, "Norwegian": 1.0, "1802": 1.0, "1829": 1.0}
    hits = ds.search(["Norwegian mathematician Niels Abel"], k=1)
    assert hits.entry_ids.tolist() == [[1]]
    # one entry, 5 tags of count 1: each weight 1/5, ties sorted by tag
    assert hits.tags == [["1802", "1829", "Abel", "Niels Abel", "Norwegian"]]
    assert hits.weights == [pytest.approx([0.2] * 5)]
    d = ds.describe()
    assert d["unit"] == "tags" and d["size"] == 4 and d["tags"] > 10 and "extractor" in d["tag_source"]


def test_weights_are_aggregated_by_hand(tmp_path):
    texts = ["red apple", "red cherry", "blue sky"]
    ds = build_or_load(None, corpus(texts, tags=[["fruit", "red"], ["fruit", "red", "red"], ["sky"]]), "col",
                       tmp_path, chunking="record", retriever="bm25", weighting="uniform", progress=False)
    assert ds.manifest["tag_source"] == "column 'tags'"
    hits = ds.search(["red"], k=2)  # entries 0 and 1 match, weight 1/2 each
    # entry 0: fruit 1/2, red 1/2;  entry 1 (a repeated value counts twice): fruit 1/3, red 2/3
    assert sorted(hits.entry_ids[0].tolist()) == [0, 1]
    assert hits.tags[0] == ["red", "fruit"]
    assert hits.weights[0] == pytest.approx([0.5 * 1 / 2 + 0.5 * 2 / 3, 0.5 * 1 / 2 + 0.5 * 1 / 3])
    # softmax weighting with temperature T: w_j ∝ exp(s_j / T)
    soft = TagDatastore.load(ds.folder, weighting="softmax", temperature=0.5)
    ids, scores = soft.entries.search_ids(["red apple"], 2)
    got = soft.search(["red apple"], k=2)
    s = scores[0]
    w = np.exp((s - s.max()) / 0.5)
    w = w / w.sum()
    tags = {"fruit": 0.0, "red": 0.0}
    for j, e in enumerate(ids[0]):
        for t, c in soft.entry_tags(int(e)).items():
            tags[t] += w[j] * c / sum(soft.entry_tags(int(e)).values())
    assert got.tags[0] == sorted(tags, key=lambda t: (-tags[t], t))
    assert got.weights[0] == pytest.approx([tags[t] for t in got.tags[0]])
    assert math.isclose(sum(got.weights[0]), 1.0, rel_tol=1e-6)


def test_bias_evidence_matches_tag_bias_input(tmp_path):
    from rcd.control.tag_bias import TagBias

    ds = build_or_load(None, corpus(GLOSSES, title=["Aalto", "Abel", "Plato", "volcano"]), "gloss", tmp_path,
                       chunking="record", retriever="bm25", progress=False)
    tok = char_tokenizer()
    hits = ds.search(["Plato Socrates", "Alvar Aalto"], k=1, max_tags=3)
    ids, weights = hits.bias_evidence(tok)
    assert len(ids) == 2 and all(len(r) == 2 * len(t) for r, t in zip(ids, hits.tags))  # both spellings
    assert ids[0][0] == tag_token_ids(tok, hits.tags[0][0])[0] and weights[0][:2] == [hits.weights[0][0]] * 2
    TagBias(beta=1.0, vocab_size=len(tok)).set_evidence(ids, weights)


def test_column_must_exist_and_model_free_build(tmp_path):
    with pytest.raises(ValueError, match="tag_field='labels'"):
        build_or_load(None, corpus(GLOSSES), "gloss", tmp_path, tag_field="labels", retriever="bm25", progress=False)


def test_sharded_tags_merge_like_unsharded(tmp_path):
    texts = GLOSSES + ["MACBETH.\nSo foul and fair a day I have not seen.", "BANQUO.\nHow far is't call'd to Forres?"]
    ds = corpus(texts)
    kw = dict(chunking="sentence", chunk_size=12, overlap=0, retriever="bm25", progress=False)
    full = build_or_load(None, ds, "mix", tmp_path / "full", **kw)
    for i in range(3):
        build_or_load(None, ds, "mix", tmp_path / "sh", shard=i, num_shards=3, **kw)
    merged = merge_shards(None, ds, "mix", tmp_path / "sh", num_shards=3, **kw)
    assert merged.folder.name == full.folder.name
    assert merged.vocab == full.vocab
    assert [merged.entry_tags(i) for i in range(len(full))] == [full.entry_tags(i) for i in range(len(full))]
    q = ["foul day", "Finnish architect", "Forres"]
    a, b = full.search(q, 2), merged.search(q, 2)
    assert a.tags == b.tags and a.weights == b.weights and a.entry_ids.tolist() == b.entry_ids.tolist()
    with pytest.raises(base.DatastoreError, match="shard 0 of 2"):
        merge_shards(None, ds, "mix", tmp_path / "none", num_shards=2, **kw)


def test_dense_tag_search_and_query_vectors(tmp_path):
    ds = build_or_load(None, corpus(GLOSSES, title=["Aalto", "Abel", "Plato", "volcano"]), "gloss", tmp_path,
                       chunking="record", retriever="dense", progress=False)
    hits = ds.search(["a Greek thinker who taught Aristotle"], k=2)
    assert hits.entry_ids[0, 0].item() == 2
    # the nearest entry dominates the softmax (T = 0.05): its 6 tags come first
    assert set(hits.tags[0][:6]) == set(ds.entry_tags(2)) == {"Plato", "Athenian", "Socrates", "Aristotle", "428", "347"}
    vec = ds.search_vectors(ds.entries.encode(["a Greek thinker who taught Aristotle"]), k=2)
    assert vec.tags == hits.tags and vec.weights[0] == pytest.approx(hits.weights[0], abs=1e-5)
