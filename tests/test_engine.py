"""The decoding engine: cache handling, schedules firing on the right steps, context re-prefill,
REPLUG, cost/provenance, the model.generate adapter and perplexity scoring with retrieval."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from rcd.control.context import ContextControl, Passage, PromptTemplate
from rcd.control.knn import KNNInterpolation
from rcd.control.replug import ReplugEnsemble
from rcd.engine import Engine, EngineError, Request
from rcd.schedule import Adaptive, EveryN, Once, Sentence
from rcd.strategy import Strategy
from rcd.tasks.perplexity import score


@dataclass
class FakeHits:
    ids: torch.Tensor
    scores: torch.Tensor
    texts: list
    doc_ids: list


class FakeChunks:
    """ChunkDatastore stand-in: score = number of shared words (+ 0.01·index to break ties)."""

    unit = "chunks"

    def __init__(self, texts):
        self.texts = list(texts)
        self.queries: list[str] = []

    def search(self, queries, k):
        self.queries.extend(queries)
        ids, sc, tx, di = [], [], [], []
        for q in queries:
            s = [len(set(q.split()) & set(t.split())) + 0.01 * j for j, t in enumerate(self.texts)]
            order = sorted(range(len(s)), key=lambda j: -s[j])[:k]
            ids.append(order)
            sc.append([float(s[j]) for j in order])
            tx.append([self.texts[j] for j in order])
            di.append([f"d{j}" for j in order])
        return FakeHits(torch.tensor(ids), torch.tensor(sc), tx, di)


DOCS = ["the cat sat on the mat", "to be is to do", "hello there world", "a rose is a rose"]
PROMPTS = ["hello world", "to be or not to be"]


def ctx_strategy(schedule, k=2, control=None):
    return Strategy("ctx", datastore=FakeChunks(DOCS), control=control or ContextControl(), schedule=schedule)


def fresh_logprobs(lm, ids):
    with torch.no_grad():
        return torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)


# --------------------------------------------------------------------------- plain decoding
def test_plain_engine_matches_model_generate(tiny_lm):
    tok, model = tiny_lm.tokenizer, tiny_lm.model
    out = Engine(tiny_lm, None, max_new_tokens=8, stop_at_eos=False).generate(PROMPTS)
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    ref = model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.token_ids == ref[:, enc["input_ids"].shape[1]:].tolist()
    assert out.cost["tokens"] == 16 and out.cost["retrievals"] == 0 and out.cost["ttft"] > 0
    assert out.cost["tokens_per_s"] == pytest.approx(16 / out.cost["wall_s"])


def test_every_step_equals_fresh_forward_of_the_full_prompt(tiny_lm):
    """Cache continuation and re-prefill both reproduce a fresh forward pass on the full prompt."""
    trace: list = []
    eng = Engine(tiny_lm, ctx_strategy(EveryN(3)), k=2, max_new_tokens=7, stop_at_eos=False, trace=trace)
    eng.generate(PROMPTS)
    fired_steps = [r["step"] for r in trace if bool(r["fire"].any())]
    assert fired_steps == [0, 3, 6]
    for rec in trace:
        for b, prompt in enumerate(PROMPTS):
            text = eng.template.render(tiny_lm.tokenizer, prompt, rec["passages"][b])
            ids = tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"] + rec["gen"][b]
            assert torch.allclose(rec["logprobs"][b], fresh_logprobs(tiny_lm, ids), atol=1e-4), rec["step"]


def test_context_passages_follow_the_template(tiny_lm):
    trace: list = []
    tmpl = PromptTemplate(header="Context:\n", passage="[{rank}] {text}", joiner="\n", footer="\n\n")
    eng = Engine(tiny_lm, ctx_strategy(Once()), template=tmpl, k=2, max_new_tokens=2, trace=trace)
    eng.generate([Request("hello world")])
    # "hello world" shares 2 words with doc 2, 0 with the others (doc 3 wins the tie on 0.03)
    assert [p.doc_id for p in trace[0]["passages"][0]] == ["d2", "d3"]
    assert eng.template.render(tiny_lm.tokenizer, "Q", trace[0]["passages"][0]) == \
        "Context:\n[1] hello there world\n[2] a rose is a rose\n\nQ"


# --------------------------------------------------------------------------- schedules in the engine
def test_once_and_every_n_fire_on_exact_steps(tiny_lm):
    for sched, want in [(Once(), [0]), (EveryN(4), [0, 4, 8])]:
        st = ctx_strategy(sched)
        out = Engine(tiny_lm, st, k=1, max_new_tokens=10, stop_at_eos=False).generate(PROMPTS)
        steps = sorted({r["step"] for r in out.provenance})
        assert steps == want
        assert out.cost["retrievals"] == len(want) * 2
        assert out.cost["retrieval_rate"] == pytest.approx(len(want) * 2 / 20)


def test_sentence_schedule_fires_after_boundary_tokens(tiny_lm):
    plain = Engine(tiny_lm, None, max_new_tokens=12, stop_at_eos=False).generate(PROMPTS)
    # choose as boundary the character the model emits at step 3 of row 0: it must occur
    boundary = tiny_lm.tokenizer.decode([plain.token_ids[0][3]])
    assert len(boundary) == 1 and boundary.strip()
    sched = Sentence(boundary=boundary, newline=False).bind(tiny_lm.tokenizer)
    out = Engine(tiny_lm, ctx_strategy(sched), k=1, max_new_tokens=12, stop_at_eos=False).generate(PROMPTS)
    for b in range(2):
        got = sorted(r["step"] for r in out.provenance if r["row"] == b)
        gen = out.token_ids[b]
        want = [0] + [t for t in range(1, 12) if tiny_lm.tokenizer.decode([gen[t - 1]]) == boundary]
        assert got == want
    assert any(len([r for r in out.provenance if r["row"] == b]) > 1 for b in range(2))


def test_adaptive_fires_where_confidence_is_low(tiny_lm):
    trace: list = []
    sched = Adaptive(threshold=0.0135, mode="max_prob", fire_at_start=True)  # max p of the tiny model ≈ 0.013-0.015
    eng = Engine(tiny_lm, ctx_strategy(sched), k=1, max_new_tokens=10, stop_at_eos=False, trace=trace)
    out = eng.generate(PROMPTS)
    for b in range(2):
        got = sorted(r["step"] for r in out.provenance if r["row"] == b)
        want = []
        # the decision at step t is taken on p_t *before* retrieval: recompute it from the prompt
        # the row had at that time (passages of the previous retrieval) and the tokens so far
        for rec in trace:
            t = rec["step"]
            if t == 0:
                want.append(0)
                continue
            prev = trace[t - 1]["passages"][b]
            text = eng.template.render(tiny_lm.tokenizer, PROMPTS[b], prev)
            ids = tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"] + rec["gen"][b]
            if fresh_logprobs(tiny_lm, ids).exp().max() < 0.0135:
                want.append(t)
        assert got == want
        assert 1 < len(got) < 10  # fires at some steps but not all
    # rows fire at different steps: only the firing rows are re-prefilled and spliced into the batch
    # cache, and every row's distribution still equals a fresh pass over its own full prompt
    fired_rows = [tuple(bool(f) for f in rec["fire"]) for rec in trace]
    assert any(len(set(f)) == 2 for f in fired_rows)
    for rec in trace:
        for b in range(2):
            text = eng.template.render(tiny_lm.tokenizer, PROMPTS[b], rec["passages"][b])
            ids = tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"] + rec["gen"][b]
            assert torch.allclose(rec["logprobs"][b], fresh_logprobs(tiny_lm, ids), atol=1e-4)


class ZeroKnnStore:
    unit, metric = "tokens", "l2"
    manifest = {"layer": "final"}

    def search(self, q, k):
        from rcd.datastore.tokens import Neighbours

        n = q.shape[0]
        return Neighbours(torch.zeros(n, 1), torch.zeros(n, 1, dtype=torch.long), torch.full((n, 1), 5), "l2")


def test_calibrated_adaptive_hits_target_rate_in_decoding(tiny_lm):
    """Calibrate θ on a development stream, then decode: the firing rate is the target ± 0.05."""
    prompts = ["hello world", "to be or not", "the cat", "a rose is", "slings and", "whether tis"]
    trace: list = []
    Engine(tiny_lm, None, max_new_tokens=20, stop_at_eos=False, trace=trace).generate(prompts)
    conf = torch.stack([r["logprobs"].exp().max(-1).values for r in trace])  # [T, B]
    for target in (0.2, 0.5):
        sched = Adaptive(threshold=None, target_rate=target, fire_at_start=False)
        sched.calibrate(conf)
        # λ = 0: kNN evidence leaves p unchanged, so decoding follows the development stream
        st = Strategy("a", datastore=ZeroKnnStore(), control=KNNInterpolation(k=1, lmbda=0.0), schedule=sched)
        out = Engine(tiny_lm, st, max_new_tokens=20, stop_at_eos=False).generate(prompts)
        assert abs(out.cost["retrieval_rate"] - target) <= 0.05
        assert abs(sched.retrieval_rate - target) <= 0.05


# --------------------------------------------------------------------------- REPLUG
def test_replug_with_one_document_equals_context(tiny_lm):
    t1, t2 = [], []
    a = Engine(tiny_lm, ctx_strategy(EveryN(4)), k=1, max_new_tokens=9, stop_at_eos=False, trace=t1).generate(PROMPTS)
    st = Strategy("replug", datastore=FakeChunks(DOCS), control=ReplugEnsemble(), schedule=EveryN(4))
    assert st.control.views(3) == 3 and st.control.rebuilds_prompt
    b = Engine(tiny_lm, st, k=1, max_new_tokens=9, stop_at_eos=False, trace=t2).generate(PROMPTS)
    assert a.token_ids == b.token_ids
    for r1, r2 in zip(t1, t2):
        assert torch.allclose(r1["logprobs"], r2["logprobs"], atol=1e-5)


def test_replug_mixes_document_distributions(tiny_lm):
    trace: list = []
    st = Strategy("replug", datastore=FakeChunks(DOCS), control=ReplugEnsemble(temperature=0.5), schedule=Once())
    eng = Engine(tiny_lm, st, k=2, max_new_tokens=3, stop_at_eos=False, trace=trace)
    eng.generate(["hello world"])
    # docs: d2 score 2.02, d3 score 0.03; weights softmax([2.02, 0.03] / 0.5)
    w = torch.softmax(torch.tensor([2.02, 0.03]) / 0.5, 0)
    for rec in trace:
        ps = [Passage("hello there world", "d2", 2.02, 1), Passage("a rose is a rose", "d3", 0.03, 2)]
        mix = 0
        for wd, p in zip(w, ps):
            text = eng.template.render(tiny_lm.tokenizer, "hello world", [p])
            ids = tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"] + rec["gen"][0]
            mix = mix + wd * fresh_logprobs(tiny_lm, ids).exp()
        assert torch.allclose(rec["logprobs"][0].exp(), mix, atol=1e-5)


# --------------------------------------------------------------------------- adapter, cost, provenance
def test_model_generate_adapter_matches_engine(tiny_lm):
    tok, model = tiny_lm.tokenizer, tiny_lm.model
    st = ctx_strategy(EveryN(3))
    eng = Engine(tiny_lm, st, k=2, max_new_tokens=7, stop_at_eos=False)
    want = eng.generate(PROMPTS).token_ids
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    from transformers import LogitsProcessorList

    got = model.generate(**enc, logits_processor=LogitsProcessorList([eng.processor()]), max_new_tokens=7,
                         min_new_tokens=7, do_sample=False, pad_token_id=tok.pad_token_id)
    assert got[:, enc["input_ids"].shape[1]:].tolist() == want


def test_provenance_records_each_retrieval(tiny_lm):
    prov: list = []
    eng = Engine(tiny_lm, ctx_strategy(EveryN(5)), k=2, max_new_tokens=6, stop_at_eos=False, provenance=prov,
                 task="qa", query="prompt")
    out = eng.generate([Request("hello world", id="q1"), Request("to be", id="q2")])
    assert prov == out.provenance and len(prov) == 4
    assert {(r["id"], r["step"]) for r in prov} == {("q1", 0), ("q1", 5), ("q2", 0), ("q2", 5)}
    r = [r for r in prov if r["id"] == "q1"][0]
    assert r["query"] == "hello world" and r["doc_ids"] == ["d2", "d3"] and r["ids"] == [2, 3]
    assert r["scores"] == pytest.approx([2.02, 0.03]) and r["task"] == "qa" and r["control"] == "context"
    assert out.retrieved[0] == ["d2", "d3", "d2", "d3"] and out.fired == [2, 2]
    for key in ("retrievals", "retrieval_s", "model_s", "tokens", "ttft", "tokens_per_s", "retrieval_rate"):
        assert key in out.cost


def test_query_modes(tiny_lm):
    st = ctx_strategy(EveryN(4))
    e = Engine(tiny_lm, st, k=1, query="auto", query_tokens=3)
    req = Request("hello world", query="who?")
    gen = tiny_lm.tokenizer("abcdef", add_special_tokens=False)["input_ids"]
    assert e.build_query(req, [], 0) == "who?"
    assert e.build_query(req, gen, 4) == "who? def"
    e.query_mode = "last_tokens"
    assert e.build_query(req, gen, 4) == "def"
    e.query_mode = "last_sentence"
    gen2 = tiny_lm.tokenizer("One. Two three", add_special_tokens=False)["input_ids"]
    assert e.build_query(req, gen2, 4) == "Two three"
    with pytest.raises(EngineError, match="query mode"):
        Engine(tiny_lm, st, query="tail")


# --------------------------------------------------------------------------- perplexity with retrieval
def test_context_perplexity_is_the_nll_with_passages_prepended(tiny_lm):
    tok = tiny_lm.tokenizer
    text = "hello world, to be or not to be."
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    st = ctx_strategy(EveryN(10))
    eng = Engine(tiny_lm, st, k=1, query_tokens=4)
    res = score(tiny_lm, ids, window=64, stride=32, engine=eng)  # the one scorer
    n = len(ids)
    # fires at 0, 10, 20, 30; the step-0 query would hold 1 token < min(16, query_tokens=4): moved to position 3
    assert res.extra["fire_positions"] == [3, 10, 20, 30] and res.nll.shape == (n - 1,)
    assert res.nll[:3] == pytest.approx(res.nll_none[:3])
    for p in range(3, n - 1):
        f = max(3, (p // 10) * 10)
        q = tok.decode(ids[max(0, f + 1 - 4):f + 1].tolist())
        hit = st.datastore.search([q], 1)
        prefix = tok(eng.template.block([Passage(hit.texts[0][0])]), add_special_tokens=False)["input_ids"]
        want = -fresh_logprobs(tiny_lm, prefix + ids[:p + 1].tolist())[ids[p + 1]]
        assert res.nll[p] == pytest.approx(float(want), abs=1e-4), p
    # the plain NLL comes from the usual sliding window
    assert res.nll_none == pytest.approx(score(tiny_lm, ids, window=64, stride=32).nll_none, abs=1e-5)


def test_replug_perplexity_mixes_target_probabilities(tiny_lm):
    tok = tiny_lm.tokenizer
    ids = tok("hello world again", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    st = Strategy("replug", datastore=FakeChunks(DOCS), control=ReplugEnsemble(), schedule=Once())
    eng = Engine(tiny_lm, st, k=2, query_tokens=8)
    res = eng.score(ids, window=64, stride=32)  # once: the query waits for min(16, 8) = 8 tokens
    assert res.extra["fire_positions"] == [7]
    hit = st.datastore.search([tok.decode(ids[:8].tolist())], 2)
    w = torch.softmax(hit.scores[0].double(), 0)
    assert res.nll[:7] == pytest.approx(res.nll_none[:7])
    for p in range(7, len(ids) - 1):
        pr = 0.0
        for j in range(2):
            prefix = tok(eng.template.block([Passage(hit.texts[0][j])]), add_special_tokens=False)["input_ids"]
            pr += float(w[j]) * float(fresh_logprobs(tiny_lm, prefix + ids[:p + 1].tolist()).exp()[ids[p + 1]])
        assert res.nll[p] == pytest.approx(-math.log(pr), abs=1e-4)


def test_scorer_steps_run_over_the_whole_text(tiny_lm):
    """every_n fires at global positions 0, n, 2n, ... whatever the window layout."""
    ids = torch.arange(3, 43)  # 40 tokens, 39 scored positions
    st = Strategy("k", datastore=ZeroKnnStore(), control=KNNInterpolation(k=1, lmbda=0.5, datastore=ZeroKnnStore()),
                  schedule=EveryN(5))
    res = score(tiny_lm, ids, st.control, st.schedule, window=16, stride=8)
    assert res.fired == 8  # positions 0, 5, ..., 35
    fired_at = torch.tensor(res.nll != res.nll_none)
    assert fired_at.nonzero().view(-1).tolist() == [p for p in range(0, 39, 5) if int(ids[p + 1]) != 5]
    ctx = ctx_strategy(EveryN(5))
    res2 = Engine(tiny_lm, ctx, k=1, min_query_tokens=1).score(ids, window=16, stride=8)
    assert res2.extra["fire_positions"] == list(range(0, 39, 5))
    # with the default (a query needs min(16, query_tokens) tokens) 0, 5, 10 merge into 15
    res3 = Engine(tiny_lm, ctx_strategy(EveryN(5)), k=1).score(ids, window=16, stride=8)
    assert res3.extra["fire_positions"] == [15, 20, 25, 30, 35]


def test_engine_refuses_a_control_without_datastore(tiny_lm):
    with pytest.raises(EngineError, match="needs a datastore"):
        Engine(tiny_lm, Strategy("x", control=ContextControl(), schedule=Once()))


# --------------------------------------------------------------------------- tags
@dataclass
class FakeTagHits:
    tags: list
    weights: list


class FakeTags:
    unit = "tags"

    def search(self, queries, k):
        return FakeTagHits([["xyz"] for _ in queries], [[1.0] for _ in queries])


def test_tag_bias_steers_after_retrieval(tiny_lm):
    from rcd.control.tag_bias import TagBias

    tok = tiny_lm.tokenizer
    x, y, z = (tok.convert_tokens_to_ids(c) for c in "xyz")
    trace, prov = [], []
    st = Strategy("tags", datastore=FakeTags(), control=TagBias(beta=3.0, continuation=True), schedule=Once())
    eng = Engine(tiny_lm, st, k=4, max_new_tokens=6, stop_at_eos=False, tag_format="{tag}", trace=trace,
                 provenance=prov)
    eng.generate(["hello"])
    assert prov[0]["tags"] == ["xyz"] and prov[0]["weights"] == [1.0]
    for rec in trace:
        gen = rec["gen"][0]
        ids = tok("hello", add_special_tokens=False)["input_ids"] + gen
        bias = torch.zeros(len(tok))
        bias[x] += 1.0  # b_v: the tag starts with x
        if gen[-1:] == [x]:
            bias[y] += 1.0  # continuation: "x" begun -> y
        if gen[-2:] == [x, y]:
            bias[z] += 1.0
        want = torch.log_softmax(fresh_logprobs(tiny_lm, ids) + 3.0 * bias, -1)
        assert torch.allclose(rec["logprobs"][0], want, atol=1e-5)
    # β = 50: only biased tokens survive (x first; then x or the tag's continuation)
    st2 = Strategy("tags", datastore=FakeTags(), control=TagBias(beta=50.0, continuation=True), schedule=Once())
    out = Engine(tiny_lm, st2, max_new_tokens=6, stop_at_eos=False, tag_format="{tag}").generate(["hello"])
    text = out.texts[0]
    assert text[0] == "x" and all(c == "x" or text[:i].endswith({"y": "x", "z": "xy"}.get(c, "-"))
                                  for i, c in enumerate(text))


# --------------------------------------------------------------------------- presets
DESIGN = {  # preset: (datastore unit, control class, schedule class) — the DESIGN table
    "once": ("chunks", "ContextControl", "Once"),
    "every_n": ("chunks", "ContextControl", "EveryN"),
    "per_sentence": ("chunks", "ContextControl", "Sentence"),
    "adaptive": ("chunks", "ContextControl", "Adaptive"),
    "per_token": ("tokens", "KNNInterpolation", "EveryToken"),
    "replug": ("chunks", "ReplugEnsemble", "Once"),
    "tags": ("tags", "TagBias", "Sentence"),
    "latent_kv": ("latent", "KVInjection", "Once"),
    "knn_attention": ("latent", "KNNAttention", "EveryToken"),
    "verify": ("chunks", "Verify", "Sentence"),
}


def test_every_design_preset_composes_and_validates():
    from test_run import cfg_for

    from rcd.strategy import validate

    for preset, (unit, control, schedule) in DESIGN.items():
        cfg = cfg_for([f"+strategy={preset}"])
        assert cfg.datastore.unit == unit, preset
        assert cfg.strategy.control._target_.endswith(control), preset
        assert cfg.strategy.schedule._target_.endswith(schedule), preset
        validate(cfg)
    # an axis override composes another cell
    cfg = cfg_for(["+strategy=once", "strategy/control=replug", "strategy/schedule=every_n"])
    assert cfg.strategy.control._target_.endswith("ReplugEnsemble") and cfg.strategy.schedule.n == 16
    validate(cfg)
    # a cell that cannot work fails naming the valid choices
    from rcd.strategy import StrategyError

    with pytest.raises(StrategyError, match=r"KVInjection cannot use a 'chunks' datastore; it accepts \['latent'\]"):
        validate(cfg_for(["+strategy=once", "strategy/control=kv_injection"]))
    with pytest.raises(StrategyError, match=r"TagBias cannot use a 'chunks' datastore; it accepts \['tags'\]"):
        validate(cfg_for(["+strategy=per_sentence", "strategy/control=tag_bias"]))


# --------------------------------------------------------------------------- tasks through rcd.run
def test_lm_task_runs_context_presets_end_to_end(tmp_path):
    """rcd.run on the LM task: perplexity through the engine, generation through the model.generate adapter."""
    import json
    from pathlib import Path

    from conftest import TEXTS, tiny_llama
    from test_run import cfg_for

    from rcd.run import execute

    model, tok = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:2]))
    held = "Whether the slings of fortune or the arrows of the mind, we suffer a sea of troubles.\n"
    (tmp_path / "h.jsonl").write_text(json.dumps({"text": held}) + "\n")
    setup = [f"model.name={tmp_path / 'm'}", "corpus=files", f"corpus.datastore.data_files={tmp_path / 'c.jsonl'}",
             f"corpus.heldout.data_files={tmp_path / 'h.jsonl'}", "task.eval_tokens=40", "task.max_new_tokens=4",
             "task.window=32", "task.stride=16", f"datastore_root={tmp_path / 'ds'}", f"runs_root={tmp_path / 'runs'}",
             "progress=false", "task.prompts=['To be, or not to be','The slings and arrows']"]
    common = ["datastore.retriever=bm25", "datastore.chunking=sentence", "datastore.chunk_size=8",
              "datastore.overlap=0"]
    for preset in ("once", "every_n", "replug"):
        res = execute(cfg_for([f"+strategy={preset}", "strategy.retrieval.k=2"] + common + setup))
        p = res["metrics"]["perplexity"]
        assert p["tokens"] == 39 and p["perplexity"] > 0 and p["perplexity"] != p["perplexity_none"]
        # the first query waits for 16 tokens ("Whether the slin": BM25 finds "Whether"), then every 8
        want = 1 if preset in ("once", "replug") else len([15] + list(range(16, 39, 8)))
        assert p["retrieval_rate"] == pytest.approx(want / 39)
        assert len(res["samples"][preset]) == 2 and res["metrics"]["generation"][preset]["new_tokens"] == 8
        prov = [json.loads(x) for x in (Path(res["run"]["folder"]) / "provenance.jsonl").read_text().splitlines()]
        scoring = [p["step"] for p in prov if p["phase"] == "score"]
        assert scoring == ([15] if preset != "every_n" else [15, 16, 24, 32])
        assert all(p["query"] and p["doc_ids"] for p in prov)
        assert sorted(p["row"] for p in prov if p["phase"] == "generate" and p["step"] == 0) == [0, 1]


def test_tag_perplexity_applies_the_bias_from_the_first_firing_position(tiny_lm):
    from rcd.control.tag_bias import TagBias

    tok = tiny_lm.tokenizer
    ids = tok("hello. xyz world. xyz", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    sched = Sentence(boundary=".", newline=False).bind(tok)
    st = Strategy("tags", datastore=FakeTags(), control=TagBias(beta=2.0, continuation=True), schedule=sched)
    res = Engine(tiny_lm, st, k=2, tag_format="{tag}", min_query_tokens=1).score(ids, window=64, stride=32)
    dots = [p for p in range(1, len(ids) - 1) if int(ids[p]) == tok.convert_tokens_to_ids(".")]
    assert res.extra["fire_positions"] == [0] + dots and res.fired == 1 + len(dots)
    with torch.no_grad():
        logits = tiny_lm.model(ids.view(1, -1)).logits[0].float()
    bias = torch.zeros(logits.shape[-1])
    bias[tok.convert_tokens_to_ids("x")] = 1.0
    want = -torch.log_softmax(logits[:-1] + 2.0 * bias, -1).gather(1, ids[1:].view(-1, 1)).squeeze(1)
    assert res.nll == pytest.approx(want.double().numpy(), abs=1e-5)


def test_span_filter_only_emits_text_from_the_evidence(tiny_lm):
    from rcd.control.span_filter import SpanFilter

    prov: list = []
    st = Strategy("span", datastore=FakeChunks(DOCS), control=SpanFilter(), schedule=Once())
    prompts = ["hello world", "to be or not to be", "a rose", "the cat"]
    out = Engine(tiny_lm, st, k=2, max_new_tokens=12, provenance=prov).generate(prompts)
    assert st.control.eos == [1]  # -1 in the config: the engine sets the tokenizer's eos
    for b, text in enumerate(out.texts):
        evidence = [DOCS[int(d[1:])] for d in prov[b]["doc_ids"]]
        assert text and any(text in e for e in evidence), (text, evidence)
        # it stops with eos as soon as the span cannot continue, or at max_new_tokens
        assert out.token_ids[b][-1] == 1 or len(out.token_ids[b]) == 12


def test_engine_runs_a_gpt2_model_with_absolute_positions():
    """Explicit position ids make left padding and re-prefill exact for learned absolute positions too."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import as_loaded, char_tokenizer

    tok = char_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                       bos_token_id=1, eos_token_id=1, pad_token_id=1)).eval()
    lm = as_loaded(model, tok, name="gpt2-tiny")
    out = Engine(lm, None, max_new_tokens=6, stop_at_eos=False).generate(PROMPTS)
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    ref = model.generate(**enc, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=1)
    assert out.token_ids == ref[:, enc["input_ids"].shape[1]:].tolist()
    trace: list = []
    eng = Engine(lm, ctx_strategy(EveryN(3)), k=2, max_new_tokens=6, stop_at_eos=False, trace=trace)
    eng.generate(PROMPTS)
    for rec in trace:
        for b, prompt in enumerate(PROMPTS):
            ids = tok(eng.template.render(tok, prompt, rec["passages"][b]), add_special_tokens=False)["input_ids"]
            assert torch.allclose(rec["logprobs"][b], fresh_logprobs(lm, ids + rec["gen"][b]), atol=1e-4)
