"""Re-prefill after a retrieval reuses each row's own cached KV up to the first changed token
(rcd.engine.decoding.Decoding.refresh): the tokens it forwards are exactly the changed tail, and every
step's distribution still equals a fresh forward over the row's whole prompt."""
from __future__ import annotations

import pytest
import torch

from rcd.control.context import ContextControl, Passage, PromptTemplate
from rcd.control.replug import ReplugEnsemble
from rcd.engine import Engine
from rcd.engine.cache import common_prefix, length_groups
from rcd.control.verify import Verify
from rcd.engine.decoding import Decoding
from rcd.schedule import EveryN, Sentence
from rcd.strategy import Strategy
from conftest import as_loaded, tiny_gemma3
from test_engine import DOCS, FakeChunks, FakeHits, fresh_logprobs


class ScriptedChunks:
    """Returns, for the n-th search of row r, the documents ``script[r][n]`` (by index into ``texts``)."""

    unit = "chunks"

    def __init__(self, texts, script):
        self.texts, self.script = list(texts), script
        self.calls = [0] * len(script)
        self.order: list[int] = []  # the rows of the next search (set by run_rows)

    def search(self, queries, k):
        ids, sc, tx, di = [], [], [], []
        rows = self.order[: len(queries)]
        del self.order[: len(queries)]
        for r in rows:
            n = min(self.calls[r], len(self.script[r]) - 1)
            self.calls[r] += 1
            docs = self.script[r][n][:k]
            ids.append(docs)
            sc.append([1.0] * len(docs))
            tx.append([self.texts[j] for j in docs])
            di.append([f"d{j}" for j in docs])
        return FakeHits(torch.tensor(ids), torch.tensor(sc), tx, di)


TEXTS = ["alpha beta gamma", "the cat sat", "to be is to do", "hello there"]


def engine_with(tiny_lm, script, control=None, n=3, k=2, trace=None):
    ds = ScriptedChunks(TEXTS, script)
    eng = Engine(tiny_lm, Strategy("ctx", datastore=ds, control=control or ContextControl(), schedule=EveryN(n)),
                 k=k, max_new_tokens=9, stop_at_eos=False, trace=trace)
    return eng, ds


def record_prefills(eng):
    calls: list[list[list[int]]] = []
    orig = eng.prefill

    def prefill(seqs, cost, prefix=None):
        calls.append([list(s) for s in seqs])
        return orig(seqs, cost, prefix=prefix)
    eng.prefill = prefill
    return calls


def run_rows(eng, ds, prompts):
    """Generate, telling the scripted store which rows search (every row fires on every EveryN step)."""
    from rcd.engine import decoding

    orig = decoding.Decoding.retrieve

    def retrieve(self, rows, sentences=None):
        ds.order.extend(rows)
        return orig(self, rows, sentences)
    decoding.Decoding.retrieve = retrieve
    try:
        return eng.generate(prompts)
    finally:
        decoding.Decoding.retrieve = orig


def docs(*js):
    return [Passage(TEXTS[j], f"d{j}", 1.0, r + 1, j) for r, j in enumerate(js)]


def prompt_ids(eng, tiny_lm, prompt, passages):
    return tiny_lm.tokenizer(eng.template.render(tiny_lm.tokenizer, prompt, passages),
                             add_special_tokens=False)["input_ids"]


def test_changed_second_passage_reuses_the_first_and_equals_a_fresh_forward(tiny_lm):
    # row 0: [0,1] -> [0,2] (second passage changes) -> [0,2] (unchanged); row 1: [3,1] -> [2,1] -> [2,1]
    trace: list = []
    eng, ds = engine_with(tiny_lm, [[[0, 1], [0, 2], [0, 2]], [[3, 1], [2, 1], [2, 1]]], trace=trace)
    calls = record_prefills(eng)
    out = run_rows(eng, ds, ["hello world", "to be"])
    # every step equals a fresh forward over the row's prompt with its current passages
    for rec in trace:
        for b, prompt in enumerate(["hello world", "to be"]):
            ids = prompt_ids(eng, tiny_lm, prompt, rec["passages"][b]) + rec["gen"][b]
            assert torch.allclose(rec["logprobs"][b], fresh_logprobs(tiny_lm, ids), atol=1e-4), rec["step"]
    # step 3: both rows changed; each forwards only from its first changed token on
    p0a, p0b = (prompt_ids(eng, tiny_lm, "hello world", docs(0, j)) for j in (1, 2))
    p1a, p1b = (prompt_ids(eng, tiny_lm, "to be", docs(j, 1)) for j in (3, 2))
    g = out.token_ids
    # the first prefill and the step-3 re-prefill (tails of similar length: one forward); step 6 changed nothing
    want0 = (p0b + g[0][:3])[common_prefix(p0a, p0b):]
    want1 = (p1b + g[1][:3])[common_prefix(p1a, p1b):]
    assert len(calls) == 2 and calls[1] == [want0, want1]
    assert common_prefix(p0a, p0b) > len("alpha beta gamma") and common_prefix(p1a, p1b) == 0
    assert out.cost["reused_tokens"] == common_prefix(p0a, p0b) + common_prefix(p1a, p1b)


def test_unchanged_passages_cost_only_the_new_token(tiny_lm):
    trace: list = []
    eng, ds = engine_with(tiny_lm, [[[0, 1], [0, 1], [0, 1]], [[3, 1], [2, 1], [2, 1]]], trace=trace)
    calls = record_prefills(eng)
    out = run_rows(eng, ds, ["hello world", "to be"])
    # step 3: row 0 (same passages) forwards only the token it chose, batched with row 1's changed tail;
    # step 6: no row changed, a plain decoding step (no prefill)
    assert len(calls) == 2 and calls[1][0] == [out.token_ids[0][2]] and len(calls[1][1]) > 3
    for rec in trace:
        for b, prompt in enumerate(["hello world", "to be"]):
            ids = prompt_ids(eng, tiny_lm, prompt, rec["passages"][b]) + rec["gen"][b]
            assert torch.allclose(rec["logprobs"][b], fresh_logprobs(tiny_lm, ids), atol=1e-4)
    assert out.fired == [3, 3]


def test_replug_views_reuse_their_own_cache(tiny_lm):
    # REPLUG: one view per passage; view 0 keeps its document, view 1 changes
    trace: list = []
    eng, ds = engine_with(tiny_lm, [[[0, 1], [0, 2]]], control=ReplugEnsemble(), trace=trace)
    calls = record_prefills(eng)
    out = run_rows(eng, ds, ["hello world"])
    assert len(calls) == 2 and calls[1][0] == [out.token_ids[0][2]]  # view 0's prompt did not change
    for rec in trace:
        ps = rec["passages"][0]
        mix = torch.zeros_like(rec["logprobs"][0])
        w = torch.softmax(torch.tensor([1.0] * len(ps)), 0)
        for j, p in enumerate(ps):
            ids = prompt_ids(eng, tiny_lm, "hello world", [p]) + rec["gen"][0]
            mix = mix + w[j] * fresh_logprobs(tiny_lm, ids).exp()
        assert torch.allclose(rec["logprobs"][0].exp(), mix, atol=1e-5), rec["step"]


def test_sliding_window_cache_falls_back_to_a_full_prefill():
    model, tok = tiny_gemma3(sliding_window=8)
    lm = as_loaded(model, tok)
    trace: list = []
    eng, ds = engine_with(lm, [[[0, 1], [0, 2]]], trace=trace)
    calls = record_prefills(eng)
    out = run_rows(eng, ds, ["hello world"])
    assert len(calls) == 2 and out.cost["reused_tokens"] == 0
    p = prompt_ids(eng, lm, "hello world", docs(0, 2))
    assert calls[1] == [p + out.token_ids[0][:3]]
    for rec in trace:
        ids = prompt_ids(eng, lm, "hello world", rec["passages"][0]) + rec["gen"][0]
        assert torch.allclose(rec["logprobs"][0], fresh_logprobs(lm, ids), atol=1e-4)


@pytest.mark.parametrize("lengths,groups", [([5, 5, 5], [[0, 1, 2]]), ([300, 1, 290, 2], [[0, 2], [1, 3]]),
                                            ([300, 100], [[0], [1]]), ([100, 70], [[0, 1]]), ([], [])])
def test_length_groups(lengths, groups):
    assert length_groups(lengths) == groups


@pytest.mark.parametrize("a,b,n", [([1, 2, 3], [1, 2, 4], 2), ([], [1], 0), ([5], [5], 1), ([1, 2], [1, 2, 3], 2)])
def test_common_prefix(a, b, n):
    assert common_prefix(a, b) == n


class HookedContext(ContextControl):
    """A context control that says its hooks change the forward pass: cached KV must not be reused."""

    acts_in_forward = True


def test_a_control_whose_hooks_change_the_forward_recomputes_whole_rows(tiny_lm):
    eng, ds = engine_with(tiny_lm, [[[0, 1], [0, 2]]], control=HookedContext())
    calls = record_prefills(eng)
    out = run_rows(eng, ds, ["hello world"])
    assert out.cost["reused_tokens"] == 0
    assert calls[1] == [prompt_ids(eng, tiny_lm, "hello world", docs(0, 2)) + out.token_ids[0][:3]]


class RotatingChunks:
    """Every search returns document 0 and then the others in turn (the turn moves once per search)."""

    unit = "chunks"

    def __init__(self, texts):
        self.texts, self.n = list(texts), 0

    def search(self, queries, k):
        ids = [[0] + [1 + (self.n + r + j) % (len(self.texts) - 1) for j in range(k - 1)] for r in range(len(queries))]
        self.n += 1
        return FakeHits(torch.tensor(ids), torch.ones(len(ids), k), [[self.texts[j] for j in r] for r in ids],
                        [[f"d{j}" for j in r] for r in ids])


def outputs(tiny_lm, strategy, prompts, reuse, monkeypatch, **kw):
    with monkeypatch.context() as m:
        if not reuse:  # the engine before prefix reuse: every re-prefill recomputes whole rows
            m.setattr(Decoding, "reusable", lambda self: False)
        out = Engine(tiny_lm, strategy(), stop_at_eos=False, **kw).generate(prompts)
    return out


@pytest.mark.parametrize("name", ["every_n", "replug", "verify_ban", "verify_evidence"])
def test_reuse_gives_the_same_tokens_and_distributions_as_full_re_prefills(tiny_lm, monkeypatch, name):
    boundary = tiny_lm.tokenizer.decode([Engine(tiny_lm, None, max_new_tokens=4, stop_at_eos=False)
                                         .generate(["hello world"]).token_ids[0][2]])
    sentence = lambda: Sentence(boundary=boundary, newline=False).bind(tiny_lm.tokenizer)  # noqa: E731
    strategies = {
        "every_n": lambda: Strategy("c", datastore=RotatingChunks(DOCS), control=ContextControl(), schedule=EveryN(2)),
        "replug": lambda: Strategy("r", datastore=RotatingChunks(DOCS), control=ReplugEnsemble(),
                                   schedule=EveryN(3)),
        "verify_ban": lambda: Strategy("v", datastore=FakeChunks(["zzzz qqqq"]), schedule=sentence(),
                                       control=Verify(threshold=1.0, max_retries=2, regenerate="ban")),
        "verify_evidence": lambda: Strategy("v", datastore=FakeChunks(["zzzz qqqq", "hello there world"]),
                                            schedule=sentence(),
                                            control=Verify(threshold=0.9, max_retries=1, regenerate="evidence")),
    }
    prompts = ["hello world", "to be or not", "the cat sat"]
    traces = {True: [], False: []}
    tpl = PromptTemplate(header="Context:\n")  # rows share a head before their passages
    outs = {r: outputs(tiny_lm, strategies[name], prompts, r, monkeypatch, k=2, max_new_tokens=12,
                       trace=traces[r], template=tpl) for r in (True, False)}
    assert outs[True].token_ids == outs[False].token_ids
    assert len(traces[True]) == len(traces[False])
    for a, b in zip(traces[True], traces[False]):
        assert torch.allclose(a["logprobs"], b["logprobs"], atol=1e-4)
    assert outs[True].cost["reused_tokens"] > 0 and outs[False].cost["reused_tokens"] == 0
