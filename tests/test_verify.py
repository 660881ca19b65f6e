"""Verify: support scores and decisions by hand, the ban distribution, reject-and-regenerate in the engine."""
from __future__ import annotations

import math

import pytest
import torch

from rcd.control.verify import Verify, words
from rcd.engine import Engine, Request
from rcd.schedule import Sentence
from rcd.strategy import Strategy
from test_engine import FakeChunks

EVIDENCE = ["Aalto, Alvar Aalto: Finnish architect and designer (1898-1976)"]
QUESTION = "In what year was Alvar Aalto born?"


def test_words_drop_stopwords_and_punctuation():
    assert words("The year was 1898, in Finland!") == ["year", "1898", "finland"]


def test_support_hand_computed():
    v = Verify(threshold=0.5)
    # claims after removing the question's words {year, alvar, aalto, born}: {1898} -> supported
    assert v.support("Alvar Aalto was born in 1898.", EVIDENCE, QUESTION) == 1.0
    # {1927} -> 0 of 1
    assert v.support("Alvar Aalto was born in 1927.", EVIDENCE, QUESTION) == 0.0
    # {finnish, architect, 1927} -> 2 of 3
    assert v.support("A Finnish architect born in 1927.", EVIDENCE, QUESTION) == pytest.approx(2 / 3)
    # nothing beyond the question: nothing to check
    assert v.support("Alvar Aalto was born.", EVIDENCE, QUESTION) == 1.0
    # without the question, the name counts as a claim: {alvar, aalto, born, 1927} -> 2 of 4
    assert v.support("Alvar Aalto was born in 1927.", EVIDENCE) == 0.5


def test_decisions():
    v = Verify(threshold=0.6, max_retries=2)
    assert v.judge("A Finnish architect born in 1927.", EVIDENCE, 0, QUESTION) == ("accept", pytest.approx(2 / 3))
    assert v.judge("Born in 1927.", EVIDENCE, 0, QUESTION) == ("reject", 0.0)
    assert v.judge("Born in 1927.", EVIDENCE, 1, QUESTION) == ("reject", 0.0)
    assert v.judge("Born in 1927.", EVIDENCE, 2, QUESTION) == ("accept_max_retries", 0.0)
    with pytest.raises(ValueError, match="threshold"):
        Verify(threshold=1.5)
    with pytest.raises(ValueError, match="regenerate"):
        Verify(regenerate="retry")


def test_ban_only_blocks_the_rejected_sequence():
    v = Verify()
    v.ban(0, 2, [5, 6, 7])
    v.ban(0, 2, [5, 8])
    assert v.banned(0, [1, 1]) == {5}  # at the sentence start both rejected sentences begin with 5
    assert v.banned(0, [1, 1, 5]) == {6, 8}
    assert v.banned(0, [1, 1, 5, 6]) == {7}
    assert v.banned(0, [1, 1, 4]) == set()  # diverged: free
    assert v.banned(1, [1, 1]) == set()  # other rows unaffected
    # distribution: V = 4, scores log [0.1, 0.2, 0.3, 0.4]; ban token 3 -> [0.1, 0.2, 0.3] / 0.6
    v2 = Verify()
    v2.ban(0, 0, [3, 1])
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]).log()
    out = v2.apply(scores, gen=[[], []]).exp()
    assert torch.allclose(out[0], torch.tensor([1 / 6, 2 / 6, 3 / 6, 0.0]))
    assert torch.allclose(out[1], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    v2.clear(0)
    assert torch.allclose(v2.apply(scores, gen=[[], []]).exp()[0], torch.tensor([0.1, 0.2, 0.3, 0.4]))


def _sentence(lm, boundary):
    return Sentence(boundary=boundary, newline=False).bind(lm.tokenizer)


def test_threshold_zero_accepts_everything_and_equals_plain_decoding(tiny_lm):
    plain = Engine(tiny_lm, None, max_new_tokens=12, stop_at_eos=False).generate(["hello world"])
    boundary = tiny_lm.tokenizer.decode([plain.token_ids[0][2]])
    prov: list = []
    st = Strategy("v", datastore=FakeChunks(["nothing here"]), control=Verify(threshold=0.0),
                  schedule=_sentence(tiny_lm, boundary))
    out = Engine(tiny_lm, st, k=1, max_new_tokens=12, stop_at_eos=False, provenance=prov).generate(["hello world"])
    assert out.token_ids == plain.token_ids
    decisions = [p["decision"] for p in prov if p.get("event") == "verify"]
    assert decisions and set(decisions) == {"accept"}


def test_rejected_sentences_are_rolled_back_banned_and_logged(tiny_lm):
    plain = Engine(tiny_lm, None, max_new_tokens=12, stop_at_eos=False).generate(["hello world"])
    boundary = tiny_lm.tokenizer.decode([plain.token_ids[0][2]])
    prov: list = []
    # threshold 1 with evidence that shares no word with the random output: every sentence is rejected
    # until max_retries; regenerate=ban keeps the prompt, so only the ban changes the next attempt
    v = Verify(threshold=1.0, max_retries=2, regenerate="ban")
    st = Strategy("v", datastore=FakeChunks(["zzzz qqqq"]), control=v, schedule=_sentence(tiny_lm, boundary))
    out = Engine(tiny_lm, st, k=1, max_new_tokens=12, stop_at_eos=False, provenance=prov).generate(["hello world"])
    events = [p for p in prov if p.get("event") == "verify"]
    assert events, "a sentence must have been checked"
    # per sentence: reject (retry 0), reject (retry 1), accept_max_retries (retry 2)
    first = events[:3]
    assert [e["decision"] for e in first] == ["reject", "reject", "accept_max_retries"]
    assert [e["retry"] for e in first] == [0, 1, 2]
    # the three attempts are different sentences (each rejected one is banned at that start)
    assert len({e["sentence"] for e in first}) == 3
    # the kept text starts with the sentence accepted on the last retry
    assert out.texts[0].startswith(first[2]["sentence"])
    for e in events:
        assert e["support"] < 1.0 or e["decision"] == "accept"
    # each check retrieved evidence (query = prompt + sentence) and says which passages it used
    assert all(e["evidence"] == ["d0"] for e in events)
    assert len(out.token_ids[0]) == 12


def test_regenerate_with_evidence_puts_passages_in_the_prompt(tiny_lm):
    plain = Engine(tiny_lm, None, max_new_tokens=10, stop_at_eos=False).generate(["hello world"])
    boundary = tiny_lm.tokenizer.decode([plain.token_ids[0][2]])
    trace, prov = [], []
    v = Verify(threshold=1.0, max_retries=1, regenerate="evidence")
    st = Strategy("v", datastore=FakeChunks(["zzzz qqqq"]), control=v, schedule=_sentence(tiny_lm, boundary))
    eng = Engine(tiny_lm, st, k=1, max_new_tokens=10, stop_at_eos=False, trace=trace, provenance=prov)
    eng.generate([Request("hello world")])
    rejected = next(p["sentence"] for p in prov if p.get("decision") == "reject")
    # after the first rejection the row regenerates from the sentence start with the passage in its prompt
    rolled = next(i for i in range(1, len(trace)) if len(trace[i]["gen"][0]) < len(trace[i - 1]["gen"][0]) + 1)
    rec = trace[rolled]
    text = eng.template.render(tiny_lm.tokenizer, "hello world", rec["passages"][0])
    assert "zzzz qqqq" in text
    ids = tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"] + rec["gen"][0]
    with torch.no_grad():
        ref = torch.log_softmax(tiny_lm.model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
    # at the sentence start the first token of the rejected sentence is banned
    assert rec["gen"][0] == []
    ref[tiny_lm.tokenizer(rejected, add_special_tokens=False)["input_ids"][0]] = -math.inf
    ref = torch.log_softmax(ref, -1)
    assert torch.allclose(rec["logprobs"][0], ref, atol=1e-4)


def test_batched_verification_equals_one_row_at_a_time(tiny_lm):
    """Rows roll back at different steps; the spliced batch cache gives each row its own decoding."""
    plain = Engine(tiny_lm, None, max_new_tokens=10, stop_at_eos=False).generate(["hello world"])
    boundary = tiny_lm.tokenizer.decode([plain.token_ids[0][2]])
    prompts = ["hello world", "to be or not", "the cat sat"]

    def run(ps):
        prov: list = []
        v = Verify(threshold=0.9, max_retries=1, regenerate="evidence")
        st = Strategy("v", datastore=FakeChunks(["zzzz qqqq", "hello there world"]), control=v,
                      schedule=_sentence(tiny_lm, boundary))
        out = Engine(tiny_lm, st, k=1, max_new_tokens=10, stop_at_eos=False, provenance=prov).generate(ps)
        return out.token_ids, [(p["sentence"], p["decision"]) for p in prov if p.get("event") == "verify"]

    both_ids, both_log = run(prompts)
    singles = [run([p]) for p in prompts]
    assert both_ids == [s[0][0] for s in singles]
    assert sorted(both_log) == sorted(x for s in singles for x in s[1])
    assert any(d == "reject" for _, d in both_log)
