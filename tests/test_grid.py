"""The grid: the census (every unit × control × schedule cell, runs or refused and why), every allowed cell
generating and scoring on a tiny random model, and the new cells tags × context and chunks × inject (lazy KV)."""
from __future__ import annotations

import pytest
import torch

from conftest import TEXTS, as_loaded, tiny_gemma3, tiny_run_files
from rcd.control import LazyKVInjection, Passage, TagContext, TokenContext
from rcd.engine import Engine
from rcd.schedule import EveryN, Once
from rcd.strategy import Strategy
from test_engine import DOCS, FakeChunks, FakeTagHits, FakeTags, fresh_logprobs


@pytest.fixture(scope="module")
def census():
    from rcd.census import cells, summary

    rows = cells()
    return rows, summary(rows)


def test_census_states_why_a_cell_is_refused(census):
    rows, s = census
    assert s["cells"] == len(rows) == 4 * 12 * 5 and s["runs"] == 75 and s["families_covered"] == 10
    by = {(r["unit"], r["control"], r["schedule"]): r for r in rows}
    bad = by[("tokens", "context", "once")]
    assert not bad["runs"] and "cannot use a 'tokens' datastore; it accepts ['chunks', 'latent']" in bad["why"]
    assert by[("tags", "tag_context", "sentence")]["runs"] and by[("chunks", "lazy_kv", "every_n")]["runs"]
    assert by[("tokens", "token_context", "adaptive")]["runs"]
    span = by[("chunks", "span_filter", "once")]
    assert span["runs"] and not span["scores"] and "perplexity of text outside the evidence is infinite" in span["why"]
    assert all(r["why"] for r in rows if not (r["runs"] and r["scores"]))


def test_every_allowed_cell_generates_and_scores_on_a_tiny_model(tmp_path, census):
    from hydra.utils import instantiate

    from rcd import strategy as strategy_mod
    from rcd.census import compose_cell
    from rcd.errors import RcdError
    from rcd.models import load_model

    files = tiny_run_files(tmp_path)
    # passages are found by BM25 (no encoder pass); the token unit has no retriever key
    def extra(unit):
        return files["lm"] + ([] if unit == "tokens" else ["++datastore.retriever=bm25"])
    lm = load_model(str(files["model"]), "cpu", "float32")
    ids = torch.tensor(lm.tokenizer(TEXTS[2], add_special_tokens=False)["input_ids"][:40])
    corpus = None
    ran = 0
    for r in census[0]:
        if not r["runs"]:
            continue
        cfg = compose_cell(r["unit"], r["control"], r["schedule"], extra(r["unit"]))
        corpus = corpus if corpus is not None else instantiate(cfg.corpus.datastore)
        strat = strategy_mod.build(cfg, lm, corpus, corpus_name=cfg.corpus.name, datastore_root=tmp_path / "ds")
        cell = f"{r['unit']} x {r['control']} x {r['schedule']}"
        out = strat.engine.generate(["To be, or not to be"], max_new_tokens=4)
        assert 1 <= len(out.token_ids[0]) <= 4, cell
        if r["schedule"] != "sentence":  # every other schedule fires at step 0
            assert out.cost["retrievals"] >= 1, cell
        if r["scores"]:
            res = strat.engine.score(ids, window=32, stride=16)
            assert res.nll.shape == (len(ids) - 1,) and bool((res.nll >= 0).all()) and res.nll.sum() < 1e6, cell
        else:
            with pytest.raises(RcdError, match="infinite"):
                strat.engine.score(ids, window=32, stride=16)
        ran += 1
    assert ran == census[1]["runs"]


# --------------------------------------------------------------------------- tags × context
class HamletTags(FakeTags):
    def search(self, queries, k):
        return FakeTagHits([["Hamlet", "Denmark", "ghost"] for _ in queries], [[0.5, 0.3, 0.2] for _ in queries])


def test_tag_context_puts_the_retrieved_labels_in_the_prompt(tiny_lm):
    trace: list = []
    st = Strategy("tc", datastore=HamletTags(), control=TagContext(max_tags=2), schedule=Once())
    eng = Engine(tiny_lm, st, k=4, max_new_tokens=3, stop_at_eos=False, trace=trace)
    out = eng.generate(["who is it"])
    assert out.retrieved == [["Hamlet", "Denmark", "ghost"]] and out.fired == [1]
    tok = tiny_lm.tokenizer
    keywords = Passage("Keywords: Hamlet, Denmark", doc_id="tags", score=0.5)
    for rec in trace:
        assert rec["passages"][0] == [keywords]
        text = eng.template.render(tok, "who is it", [keywords])
        want = fresh_logprobs(tiny_lm, tok(text, add_special_tokens=False)["input_ids"] + rec["gen"][0])
        assert torch.allclose(rec["logprobs"][0], want, atol=1e-5)
    ids = tok("to be or not to be, that is", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    res = Engine(tiny_lm, st, k=4, query_tokens=4).score(ids, window=64, stride=32)
    p = len(ids) - 2
    prefix = tok(eng.template.block([keywords]), add_special_tokens=False)["input_ids"]
    assert res.nll[p] == pytest.approx(-float(fresh_logprobs(tiny_lm, prefix + ids[:p + 1].tolist())[ids[p + 1]]),
                                       abs=1e-4)


# --------------------------------------------------------------------------- chunks × inject (lazy KV)
class TextChunks(FakeChunks):
    def text(self, i):
        return self.texts[int(i)]


def test_lazy_kv_injects_the_chunk_text_kv_computed_once(tiny_lm):
    tok = tiny_lm.tokenizer
    trace: list = []
    ctl = LazyKVInjection(positions="shift", cache_chunks=8)
    st = Strategy("lazy", datastore=TextChunks(DOCS), control=ctl, schedule=Once())
    eng = Engine(tiny_lm, st, k=1, max_new_tokens=4, stop_at_eos=False, trace=trace, query="prompt")
    eng.generate(["hello world"])
    # one chunk at positions 0..L-1 then the prompt: exactly the chunk text followed by the prompt
    chunk = tok(DOCS[2], add_special_tokens=False)["input_ids"]
    for rec in trace:
        want = fresh_logprobs(tiny_lm, chunk + tok("hello world", add_special_tokens=False)["input_ids"] + rec["gen"][0])
        assert torch.allclose(rec["logprobs"][0], want, atol=1e-4)
    assert ctl.store.computed == 1
    eng.generate(["hello world", "hello there"])  # the same chunk again: from the cache
    assert ctl.store.computed == 1 and list(ctl.store.cache) == [2]
    small = LazyKVInjection(cache_chunks=1)
    Engine(tiny_lm, Strategy("l", datastore=TextChunks(DOCS), control=small, schedule=EveryN(2)), k=2,
           max_new_tokens=3, stop_at_eos=False).generate(["hello world"])
    assert small.store.computed >= 2 and len(small.store.cache) == 1  # the bound holds


def test_an_anchor_opens_the_prefix_and_every_chunk_is_encoded_after_it(tiny_lm):
    """strategy.control.anchor: [A][c_1]..[c_m][prompt]; one chunk = a fresh forward of A + chunk + prompt,
    r = 1 = A + all chunks' text, r = 0: each chunk's KV as encoded right after A (not alone, not after c_1)."""
    from rcd.compat import cache_layers, output_cache
    from rcd.control.inject import InjectError
    from rcd.engine.cache import forward_padded

    tok = tiny_lm.tokenizer
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    A, prompt = enc("Context:"), enc("hello world")
    c0, c2 = enc(DOCS[0]), enc(DOCS[2])

    def after(prefix):
        with torch.no_grad():
            out, _, _ = forward_padded(tiny_lm.model, 0, tiny_lm.device, [prompt], {"model_s": 0.0}, prefix=prefix,
                                       keep=len(prompt))
        return torch.log_softmax(out.logits[0].float(), -1)

    def fresh(ids):
        with torch.no_grad():
            return torch.log_softmax(tiny_lm.model(input_ids=torch.tensor([ids])).logits[0, -len(prompt):].float(), -1)

    def control(**kw):
        ctl = LazyKVInjection(positions="shift", anchor="Context:", **kw).bind(datastore=TextChunks(DOCS))
        ctl.prepare(tiny_lm, [])
        return ctl

    one = control().prefix(tiny_lm, [[2]])
    assert one.mask.shape[1] == len(A) + len(c2) and int(one.next_pos[0]) == len(A) + len(c2)
    assert torch.allclose(after(one), fresh(A + c2 + prompt), atol=1e-4)
    assert not torch.allclose(after(one), fresh(c2 + prompt), atol=1e-3)  # the anchor is really there
    full = control(recompute=1.0).prefix(tiny_lm, [[0, 2]])
    assert torch.allclose(after(full), fresh(A + c0 + c2 + prompt), atol=1e-4)
    plain = control().prefix(tiny_lm, [[0, 2]])
    with torch.no_grad():
        alone_after_a = cache_layers(output_cache(tiny_lm.model(input_ids=torch.tensor([A + c2]), use_cache=True)))
    got = plain.values[-1][0, :, len(A) + len(c0):]
    assert torch.allclose(got, alone_after_a[-1][1][0, :, len(A):], atol=1e-5)  # values carry no position
    assert plain.mask.shape[1] == len(A) + len(c0) + len(c2)
    # through the engine: generation reads A + chunk + prompt
    trace: list = []
    ctl = LazyKVInjection(positions="shift", anchor="Context:")
    eng = Engine(tiny_lm, Strategy("lazy", datastore=TextChunks(DOCS), control=ctl, schedule=Once()), k=1,
                 max_new_tokens=3, stop_at_eos=False, trace=trace, query="prompt")
    eng.generate(["hello world"])
    for rec in trace:
        want = fresh_logprobs(tiny_lm, A + c2 + prompt + rec["gen"][0])
        assert torch.allclose(rec["logprobs"][0], want, atol=1e-4)
    with pytest.raises(InjectError, match="positions=shift"):
        LazyKVInjection(positions="independent", anchor="Context:")
    assert LazyKVInjection(anchor="").anchor_text is None  # an empty anchor is no anchor


# --------------------------------------------------------------------------- tokens × context
class FakeTokens:
    """Token datastore stand-in: every query's neighbours are entries 4 and 1; context(i) = fixed corpus tokens."""

    unit, metric = "tokens", "l2"
    manifest = {"layer": "final"}

    def __init__(self, tok):
        self.tok = tok
        self.queries: list = []

    def search(self, q, k):
        from rcd.datastore.tokens import Neighbours

        self.queries.append(q.clone())
        n = q.shape[0]
        ids = torch.tensor([[4, 1]] * n)[:, :k]
        return Neighbours(scores=torch.tensor([[0.5, 2.0]] * n)[:, :k], ids=ids, tokens=ids.clone(), metric="l2")

    def context(self, i, before, after):
        return self.tok({4: " the rose", 1: " to be"}[int(i)], add_special_tokens=False)["input_ids"]


def test_token_context_puts_the_text_around_the_query_states_neighbours_in_the_prompt(tiny_lm):
    from rcd.hooks import HiddenCapture

    tok = tiny_lm.tokenizer
    store = FakeTokens(tok)
    trace: list = []
    st = Strategy("tk", datastore=store, control=TokenContext(before=4, after=2), schedule=Once())
    eng = Engine(tiny_lm, st, k=2, query_tokens=5, max_new_tokens=3, stop_at_eos=False, trace=trace)
    out = eng.generate(["hello world"])
    assert out.retrieved == [["entry-4", "entry-1"]] and out.cost["retrievals"] == 1
    prompt = tok("hello world", add_special_tokens=False)["input_ids"]
    with torch.no_grad(), HiddenCapture(tiny_lm.model, "final") as cap:  # the query: the last 5 prompt tokens alone
        tiny_lm.model(input_ids=torch.tensor([prompt[-5:]]))
        want_q = cap.hidden[0, -1]
    assert torch.allclose(store.queries[0][0], want_q, atol=1e-5)
    ps = [Passage(" the rose", "entry-4", -0.5, 1, 4), Passage(" to be", "entry-1", -2.0, 2, 1)]
    for rec in trace:
        assert rec["passages"][0] == ps
        text = eng.template.render(tok, "hello world", ps)
        want = fresh_logprobs(tiny_lm, tok(text, add_special_tokens=False)["input_ids"] + rec["gen"][0])
        assert torch.allclose(rec["logprobs"][0], want, atol=1e-5)


def test_kv_injection_re_rotates_each_attention_type_on_gemma3():
    """Two RoPE bases (sliding-window and global layers): one injected chunk at positions 0..L-1 then the
    prompt equals the chunk text followed by the prompt, on every step."""
    lm = as_loaded(*tiny_gemma3(), name="tiny-gemma3")
    tok = lm.tokenizer
    trace: list = []
    ctl = LazyKVInjection(positions="shift")
    eng = Engine(lm, Strategy("l", datastore=TextChunks(DOCS), control=ctl, schedule=Once()), k=1, max_new_tokens=4,
                 stop_at_eos=False, trace=trace, query="prompt")
    eng.generate(["hello world", "to be"])
    assert ctl._types == ["sliding_attention", "full_attention"]
    for rec in trace:
        for b, prompt in enumerate(["hello world", "to be"]):
            chunk = tok(rec["passages"][b][0].text, add_special_tokens=False)["input_ids"]
            want = fresh_logprobs(lm, chunk + tok(prompt, add_special_tokens=False)["input_ids"] + rec["gen"][b])
            assert torch.allclose(rec["logprobs"][b], want, atol=1e-4)
