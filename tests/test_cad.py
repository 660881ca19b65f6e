"""Context-Aware Decoding: α = 0 is `once` exactly (generation and scoring); α = 0.5 equals a hand-computed
two-forward contrast; the scorer's combined_logprobs hook; the preset from config."""
import pytest
import torch

from rcd.control import ContextAwareDecoding, ContextControl, cad_logprobs
from rcd.engine import Engine
from rcd.schedule import EveryN, Once
from rcd.strategy import Strategy
from test_engine import DOCS, PROMPTS, FakeChunks

TEXT = "hello world, to be or not to be, the cat sat on the mat."


def logits_of(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([ids])).logits[0].float()


def test_cad_logprobs_hand_computed():
    z_ctx = torch.tensor([[2.0, 0.0, -1.0]])
    z_plain = torch.tensor([[1.0, 1.0, 0.0]])
    want = torch.log_softmax(torch.tensor([[1.5 * 2 - 0.5 * 1, 1.5 * 0 - 0.5 * 1, 1.5 * -1 - 0]]), -1)
    assert torch.allclose(cad_logprobs(z_ctx, z_plain, 0.5), want)
    assert torch.equal(cad_logprobs(z_ctx, z_plain, 0.0), torch.log_softmax(z_ctx, -1))
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        ContextAwareDecoding(alpha=-1)


def _engine(lm, control, schedule, trace=None, **kw):
    st = Strategy("s", datastore=FakeChunks(DOCS), control=control, schedule=schedule)
    return Engine(lm, st, k=2, max_new_tokens=6, stop_at_eos=False, trace=trace, **kw)


def test_alpha_zero_is_once_exactly(tiny_lm):
    ids = tiny_lm.tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    for sched in (Once, lambda: EveryN(8)):
        ta, tb = [], []
        a = _engine(tiny_lm, ContextControl(), sched(), ta).generate(PROMPTS)
        b = _engine(tiny_lm, ContextAwareDecoding(alpha=0.0), sched(), tb).generate(PROMPTS)
        assert a.token_ids == b.token_ids and a.fired == b.fired
        for ra, rb in zip(ta, tb):
            assert torch.equal(ra["logprobs"], rb["logprobs"])
        sa = _engine(tiny_lm, ContextControl(), sched(), query_tokens=4).score(ids, window=64, stride=32)
        sb = _engine(tiny_lm, ContextAwareDecoding(alpha=0.0), sched(), query_tokens=4).score(ids, window=64,
                                                                                               stride=32)
        assert sa.nll.tolist() == sb.nll.tolist() and sa.fired == sb.fired


def test_alpha_half_generation_equals_two_fresh_forwards(tiny_lm):
    tok = tiny_lm.tokenizer
    trace: list = []
    eng = _engine(tiny_lm, ContextAwareDecoding(alpha=0.5), Once(), trace)
    out = eng.generate(PROMPTS)
    assert out.fired == [1, 1]
    for rec in trace:
        for b, prompt in enumerate(PROMPTS):
            gen = rec["gen"][b]
            with_ctx = tok(eng.template.render(tok, prompt, rec["passages"][b][:2]), add_special_tokens=False)["input_ids"]
            plain = tok(eng.template.render(tok, prompt, []), add_special_tokens=False)["input_ids"]
            assert rec["passages"][b], "once retrieved at step 0"
            z1, z0 = logits_of(tiny_lm, with_ctx + gen)[-1], logits_of(tiny_lm, plain + gen)[-1]
            want = torch.log_softmax(1.5 * z1 - 0.5 * z0, -1)
            assert torch.allclose(rec["logprobs"][b], want, atol=1e-4)
    # the contrast is not the context alone
    ctx_trace: list = []
    _engine(tiny_lm, ContextControl(), Once(), ctx_trace).generate(PROMPTS)
    assert (trace[0]["logprobs"] - ctx_trace[0]["logprobs"]).abs().max() > 1e-2


def test_alpha_half_scoring_equals_hand_computed_contrast(tiny_lm):
    tok = tiny_lm.tokenizer
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    eng = _engine(tiny_lm, ContextAwareDecoding(alpha=0.5), EveryN(20), query_tokens=4)
    res = eng.score(ids, window=128, stride=64)
    fires = res.extra["fire_positions"]
    assert fires[0] == 3 and res.fired == len(fires) >= 2
    assert res.nll[:3] == pytest.approx(res.nll_none[:3])
    n = len(ids)
    for i, f in enumerate(fires):
        end = fires[i + 1] if i + 1 < len(fires) else n - 1
        hit = eng.datastore.search([tok.decode(ids[max(0, f - 3):f + 1].tolist())], 2)
        from rcd.control.context import passages_from_hits

        prefix = tok(eng.template.block(passages_from_hits(hit, 0)), add_special_tokens=False)["input_ids"][:64]
        for p in range(f, end):
            z1 = logits_of(tiny_lm, prefix + ids[:p + 1].tolist())[-1]
            z0 = logits_of(tiny_lm, ids[:p + 1].tolist())[-1]
            want = -torch.log_softmax(1.5 * z1 - 0.5 * z0, -1)[ids[p + 1]]
            assert res.nll[p] == pytest.approx(float(want), abs=1e-4), p


def test_combined_logprobs_is_the_documented_multi_view_hook(tiny_lm):
    """Two views, combine = view 0 alone: equals view_logprobs of that view (the single-view path)."""
    from rcd.engine.scoring import Scorer

    tok = tiny_lm.tokenizer
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    eng = _engine(tiny_lm, ContextControl(), Once())
    sc = Scorer(eng, ids, window=32, stride=16)
    prefix = tok("the cat sat", add_special_tokens=False)["input_ids"]
    got = sc.combined_logprobs([{"a": 5, "b": 40, "views": [{"prefix": prefix}, {"prefix": []}]}],
                               lambda z: torch.log_softmax(z[0], -1))[0]
    want = sc.view_logprobs([{"a": 5, "b": 40, "prefix": prefix}])[0]
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="leaves no room"):
        sc.combined_logprobs([{"a": 5, "b": 6, "views": [{"prefix": [3] * 31}]}], lambda z: z[0])


def test_cad_preset_composes_and_is_labelled():
    from rcd.labels import cell_label
    from test_run import cfg_for

    cfg = cfg_for(["+strategy=cad"])
    assert cfg.strategy.control._target_.endswith("ContextAwareDecoding") and cfg.strategy.control.alpha == 0.5
    assert cell_label(cfg) == "cad"
    assert cell_label(cfg_for(["+strategy=cad", "strategy/schedule=every_n"])) == "cad x every_n"
    assert cell_label(cfg_for(["+strategy=cad", "strategy.control.alpha=1.0"])) == "cad"
