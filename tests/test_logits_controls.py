"""Tests of the datastore-free logits controls (REPLUG ensemble, tag bias, span filter)."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LogitsProcessorList

from rcd.control.base import LogitsControl
from rcd.control.replug import ReplugEnsemble, replug_mix
from rcd.control.span_filter import SpanFilter
from rcd.control.tag_bias import TagBias

# --------------------------------------------------------------------------- REPLUG
# N=1, D=2, V=3: p_1 = [0.5, 0.3, 0.2], p_2 = [0.1, 0.6, 0.3], scores s = [ln 3, 0]
# softmax(s) = [3/4, 1/4]
# p' = 3/4·p_1 + 1/4·p_2 = [0.375+0.025, 0.225+0.15, 0.15+0.075] = [0.4, 0.375, 0.225]
P1 = [0.5, 0.3, 0.2]
P2 = [0.1, 0.6, 0.3]
DOC_LP = torch.tensor([[P1, P2]]).log()  # [1, 2, 3]
DOC_S = torch.tensor([[math.log(3.0), 0.0]])  # [1, 2]
MIX = torch.tensor([[0.4, 0.375, 0.225]])


def test_replug_mix_hand_computed():
    out = replug_mix(DOC_LP, DOC_S)
    assert torch.allclose(out.exp(), MIX, atol=1e-6)
    assert torch.allclose(out.exp().sum(-1), torch.ones(1))
    # temperature τ = 2 with scores [ln 9, 0]: softmax([ln 3, 0]) = [3/4, 1/4] again
    out_t = replug_mix(DOC_LP, torch.tensor([[math.log(9.0), 0.0]]), temperature=2.0)
    assert torch.allclose(out_t.exp(), MIX, atol=1e-6)
    # equal scores: plain average [0.3, 0.45, 0.25]
    out_eq = replug_mix(DOC_LP, torch.zeros(1, 2))
    assert torch.allclose(out_eq.exp(), torch.tensor([[0.3, 0.45, 0.25]]), atol=1e-6)


def test_replug_one_document_is_exact():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(4, 1, 50, generator=g), dim=-1)
    out = replug_mix(lp, torch.randn(4, 1, generator=g))
    assert torch.equal(out, lp[:, 0])


def test_replug_stable_and_padding_docs():
    # log-probs far below exp underflow still mix correctly in log space
    lp = torch.tensor([[[-1000.0, 0.0], [-1000.0, 0.0]]])
    out = replug_mix(lp, torch.zeros(1, 2))
    assert torch.allclose(out, torch.tensor([[-1000.0, 0.0]]))
    # a padding document with score -inf has weight 0
    out_pad = replug_mix(DOC_LP, torch.tensor([[0.0, float("-inf")]]))
    assert torch.allclose(out_pad, DOC_LP[:, 0])


def test_replug_ensemble_apply_fire_mask_and_processor_list():
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]])
    lp = torch.cat([DOC_LP, DOC_LP.flip(1)])  # row 1 swaps the documents
    s = torch.cat([DOC_S, DOC_S])
    ctl = ReplugEnsemble()
    out = ctl.apply(scores, doc_logprobs=lp, doc_scores=s, fire=torch.tensor([True, False]))
    assert torch.allclose(out[0].exp(), MIX[0], atol=1e-6)
    assert torch.equal(out[1], torch.log_softmax(scores[1], -1))
    # through transformers with stored evidence
    ctl.set_evidence(s, lp)
    out2 = LogitsProcessorList([ctl])(torch.zeros(2, 3, dtype=torch.long), scores)
    # row 1: 3/4·p_2 + 1/4·p_1 = [0.2, 0.525, 0.275]
    assert torch.allclose(out2.exp(), torch.tensor([[0.4, 0.375, 0.225], [0.2, 0.525, 0.275]]), atol=1e-6)
    # with a per-step provider of per-document logits (one forward pass per document)
    calls = []

    def provider(input_ids):
        calls.append(input_ids.shape)
        return lp * 7.0 - 3.0  # logits, not normalised: apply log-softmaxes them

    ctl2 = ReplugEnsemble(doc_logprobs_fn=provider)
    ctl2.set_evidence(s)
    out3 = LogitsProcessorList([ctl2])(torch.zeros(2, 5, dtype=torch.long), scores)
    expected = replug_mix(torch.log_softmax(lp * 7.0, -1), s)
    assert torch.allclose(out3, expected, atol=1e-6) and calls == [torch.Size([2, 5])]
    with pytest.raises(ValueError, match="set_evidence"):
        ReplugEnsemble().apply(scores)


# --------------------------------------------------------------------------- tag bias
# V=4, p = [0.4, 0.3, 0.2, 0.1], β = ln 2, tags [[1,3], [2], [1,0]] with weights 1 each
# b = [0, 2, 1, 0] (token 1 starts two tags), exp(βb) = [1, 4, 2, 1]
# p·exp(βb) = [0.4, 1.2, 0.4, 0.1], sum 2.1 -> [4/21, 12/21, 4/21, 1/21]
P = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
TAGS = [[[1, 3], [2], [1, 0]]]
W = [[1.0, 1.0, 1.0]]


def test_tag_bias_hand_computed():
    tb = TagBias(beta=math.log(2.0))
    tb.set_evidence(TAGS, W)
    out = tb.apply(P.log())
    assert torch.allclose(out.exp(), torch.tensor([[4, 12, 4, 1]]) / 21, atol=1e-6)
    assert torch.equal(tb.bias, torch.tensor([[0.0, 2.0, 1.0, 0.0]]))
    # logits in, same answer (scores are normalised first)
    assert torch.allclose(tb.apply(P.log() + 5.0), out, atol=1e-6)
    # with a known vocab size the dense bias is built at set_evidence time
    tb2 = TagBias(beta=math.log(2.0), vocab_size=4)
    tb2.set_evidence(TAGS, [[0.5, 2.0, 0.0]])  # b = [0, 0.5, 2, 0], exp(βb) = [1, √2, 4, 1]
    assert torch.equal(tb2.bias, torch.tensor([[0.0, 0.5, 2.0, 0.0]]))
    q = torch.tensor([0.4, 0.3 * math.sqrt(2), 0.8, 0.1])
    assert torch.allclose(tb2.apply(P.log()).exp(), (q / q.sum()).unsqueeze(0), atol=1e-6)


def test_tag_bias_fire_mask_and_rows():
    tb = TagBias(beta=math.log(2.0))
    tb.set_evidence([TAGS[0], []], [W[0], []])  # row 1 has no tags: unchanged
    scores = torch.cat([P.log(), P.log()])
    out = tb.apply(scores)
    assert torch.allclose(out[0].exp(), torch.tensor([4, 12, 4, 1]) / 21, atol=1e-6)
    assert torch.allclose(out[1], P.log()[0], atol=1e-6)
    out_f = tb.apply(scores, fire=torch.tensor([False, True]))
    assert torch.equal(out_f[0], torch.log_softmax(scores[0], -1))


def test_tag_bias_continuation():
    tb = TagBias(beta=math.log(2.0), continuation=True)
    tb.set_evidence(TAGS, W)
    procs = LogitsProcessorList([tb])
    prompt = torch.tensor([[2, 1]])  # ends with 1, but the prompt is never matched
    out0 = procs(prompt, P.log())
    assert tb.start == 2
    assert torch.allclose(out0.exp(), torch.tensor([[4, 12, 4, 1]]) / 21, atol=1e-6)
    # generated [1]: tags [1,3] and [1,0] are begun -> +1 on tokens 3 and 0
    # b = [1, 2, 1, 1], exp(βb) = [2, 4, 2, 2], p·exp = [0.8, 1.2, 0.4, 0.2], sum 2.6
    out1 = procs(torch.tensor([[2, 1, 1]]), P.log())
    assert torch.allclose(out1.exp(), torch.tensor([[8, 12, 4, 2]]) / 26, atol=1e-6)
    # generated [1, 3]: tag [1,3] complete, nothing begun -> base bias again
    out2 = procs(torch.tensor([[2, 1, 1, 3]]), P.log())
    assert torch.allclose(out2.exp(), torch.tensor([[4, 12, 4, 1]]) / 21, atol=1e-6)
    # a three-token tag uses the longest begun prefix: generated [.., 1, 2] -> next 3
    tb3 = TagBias(beta=math.log(2.0), continuation=True)
    tb3.set_evidence([[[1, 2, 3]]], [[1.0]], start=1)
    out3 = tb3.apply(P.log(), input_ids=torch.tensor([[0, 1, 2]]))
    # b = [0, 1, 0, 1]: exp = [1, 2, 1, 2], p·exp = [0.4, 0.6, 0.2, 0.2], sum 1.4
    assert torch.allclose(out3.exp(), torch.tensor([[4, 6, 2, 2]]) / 14, atol=1e-6)
    out4 = tb3.apply(P.log(), input_ids=torch.tensor([[0, 2]]))  # [2] does not begin [1,2,3]
    assert torch.allclose(out4.exp(), torch.tensor([[0.4, 0.6, 0.2, 0.1]]) / 1.3, atol=1e-6)
    # continuation off: input_ids are ignored
    off = TagBias(beta=math.log(2.0))
    off.set_evidence(TAGS, W)
    assert torch.allclose(off.apply(P.log(), input_ids=torch.tensor([[2, 1, 1]])).exp(), out0.exp())


def test_tag_bias_errors():
    tb = TagBias()
    with pytest.raises(ValueError, match="set_evidence"):
        tb.apply(P.log())
    with pytest.raises(ValueError, match="weights"):
        tb.set_evidence([[[1]]], [[1.0, 2.0]])
    tb.set_evidence([[[9]]], [[1.0]])
    with pytest.raises(ValueError, match="vocabulary"):
        tb.apply(P.log())


# --------------------------------------------------------------------------- span filter
EOS = 0
EVIDENCE = [[3, 4, 5, 6], [7, 4, 9]]


def is_substring(seq, evidence):
    n = len(seq)
    return any(e[i : i + n] == seq for e in evidence for i in range(len(e) - n + 1))


def test_span_filter_allowed_sets():
    sf = SpanFilter(eos_token_id=EOS)
    sf.set_evidence([EVIDENCE])
    assert sf.allowed(0, []) == [3, 4, 5, 6, 7, 9]
    assert sf.allowed(0, [4]) == [0, 5, 9]
    assert sf.allowed(0, [3, 4]) == [0, 5]  # longest suffix [3,4] only occurs in evidence 0
    assert sf.allowed(0, [7, 4]) == [0, 9]
    assert sf.allowed(0, [6]) == [0]  # end of evidence: only eos
    assert sf.allowed(0, [8]) == [0]  # no match: eos
    assert sf.allowed(0, [4, 4]) == [0, 5, 9]  # backs off to the longest matching suffix [4]
    strict = SpanFilter(eos_token_id=EOS, allow_eos=False)
    strict.set_evidence([EVIDENCE])
    assert strict.allowed(0, [4]) == [5, 9]
    assert strict.allowed(0, [6]) == [0]  # nothing allowed: fall back to eos
    empty = SpanFilter(eos_token_id=[EOS, 1])
    empty.set_evidence([[]])
    assert empty.allowed(0, []) == [0, 1]


def test_span_filter_hand_computed_distribution():
    # V=10 uniform: answer [] -> {3,4,5} each 1/3; answer [3] -> {0 (eos), 4} each 1/2
    sf = SpanFilter(eos_token_id=EOS)
    sf.set_evidence([[[3, 4, 5]]])
    scores = torch.zeros(1, 10)
    out = sf.apply(scores, input_ids=torch.tensor([[8, 8]]))
    want = torch.full((1, 10), float("-inf"))
    want[0, [3, 4, 5]] = math.log(1 / 3)
    assert torch.allclose(out, want)
    out = sf.apply(scores, input_ids=torch.tensor([[8, 8, 3]]))
    want = torch.full((1, 10), float("-inf"))
    want[0, [0, 4]] = math.log(1 / 2)
    assert torch.allclose(out, want)
    # non-uniform: p ∝ exp(s) on the allowed set only
    s = torch.tensor([[0.0, 1.0, 2.0, 3.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0]])
    out = sf.apply(s, input_ids=torch.tensor([[8, 8, 3]]))  # allowed {0, 4}: e^0 : e^1
    assert math.isclose(out[0, 0].exp().item(), 1 / (1 + math.e), rel_tol=1e-6)
    assert math.isclose(out[0, 4].exp().item(), math.e / (1 + math.e), rel_tol=1e-6)


def test_span_filter_greedy_decode_emits_substrings_then_eos():
    g = torch.Generator().manual_seed(0)
    vocab, batch = 20, 256
    sf = SpanFilter(eos_token_id=EOS)
    sf.set_evidence([EVIDENCE])  # one row of evidence, shared by all rows
    procs = LogitsProcessorList([sf])
    input_ids = torch.randint(1, vocab, (batch, 3), generator=g)  # prompt
    done = torch.zeros(batch, dtype=torch.bool)
    for _ in range(10):
        out = procs(input_ids, torch.randn(batch, vocab, generator=g) * 3)
        nxt = torch.where(done, torch.full_like(done, EOS, dtype=torch.long), out.argmax(-1))
        input_ids = torch.cat([input_ids, nxt[:, None]], dim=1)
        done |= nxt == EOS
    assert bool(done.all())
    lengths = []
    for row in input_ids[:, 3:].tolist():
        answer = row[: row.index(EOS)]
        assert len(answer) >= 1 and is_substring(answer, EVIDENCE), answer
        lengths.append(len(answer))
    assert max(lengths) >= 3  # the test exercises multi-token spans, not only single tokens


def test_span_filter_per_row_evidence_fire_mask_and_none_rows():
    sf = SpanFilter(eos_token_id=EOS)
    sf.set_evidence([[[3, 4]], [[5, 6]], None], start=1)
    scores = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[1, 3], [1, 5], [1, 2]])
    out = sf.apply(scores, input_ids=ids)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [0, 4]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [0, 6]
    assert torch.allclose(out[2], torch.log_softmax(scores[2], -1))  # None row: unconstrained
    out_f = sf.apply(scores, input_ids=ids, fire=torch.tensor([False, True, False]))
    assert torch.equal(out_f[0], torch.log_softmax(scores[0], -1))
    assert torch.equal(out_f[1], out[1])
    with pytest.raises(ValueError, match="input_ids"):
        sf.apply(scores)


def test_span_filter_inside_model_generate():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=20, n_positions=32, n_embd=16, n_layer=1, n_head=2, eos_token_id=EOS,
                     bos_token_id=EOS, pad_token_id=EOS)
    model = GPT2LMHeadModel(cfg).eval()
    sf = SpanFilter(eos_token_id=EOS)
    sf.set_evidence([EVIDENCE])
    prompt = torch.tensor([[11, 12, 13], [14, 15, 16]])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), logits_processor=LogitsProcessorList([sf]),
                         max_new_tokens=8, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    for row in out[:, 3:].tolist():
        answer = row[: row.index(EOS)] if EOS in row else row
        assert EOS in row and len(answer) >= 1 and is_substring(answer, EVIDENCE), row


# --------------------------------------------------------------------------- common contract
def _controls():
    rp = ReplugEnsemble()
    rp.set_evidence(torch.zeros(2, 2), torch.log_softmax(torch.randn(2, 2, 6, generator=torch.Generator().manual_seed(3)), -1))
    tb = TagBias(beta=1.5, continuation=True)
    tb.set_evidence([[[1, 2]], [[3]]], [[1.0], [2.0]])
    sf = SpanFilter(eos_token_id=EOS)
    sf.set_evidence([[[1, 2, 3]], [[4, 5]]])
    return [rp, tb, sf]


@pytest.mark.parametrize("idx", [0, 1, 2])
def test_contract_normalised_and_unfired_rows_unchanged(idx):
    ctl = _controls()[idx]
    assert isinstance(ctl, LogitsControl)
    scores = torch.randn(2, 6, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([[5, 1], [5, 4]])
    ctl_all = _controls()[idx]
    out = LogitsProcessorList([ctl_all])(ids, scores)
    assert out.shape == (2, 6)
    assert torch.allclose(out.exp().sum(-1), torch.ones(2), atol=1e-6)
    none = ctl.apply(scores, input_ids=ids, fire=torch.tensor([False, False]))
    assert torch.equal(none, torch.log_softmax(scores, -1))
