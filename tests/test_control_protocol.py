"""The control protocol: a control written outside rcd (module + YAML) runs generate, perplexity and QA;
a control that does nothing is refused; processors are reused across generate calls and chain with
transformers' processors; every path reads the key layer from the datastore."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from conftest import tiny_run_files
from rcd.control import Control, ControlError, ContextControl, KNNInterpolation, LogitsControl, SpanFilter, TagBias
from rcd.control import check_protocol
from rcd.engine import Engine
from rcd.schedule import EveryN, scheduled
from rcd.strategy import Strategy
from test_engine import DOCS, PROMPTS, FakeChunks, fresh_logprobs
from test_knn import FakeStore

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = Path(__file__).parent / "fixtures" / "outside"


def boost_reference(lm, base: torch.Tensor, texts, beta: float) -> torch.Tensor:
    allowed = sorted({t for x in texts for t in lm.tokenizer(x, add_special_tokens=False)["input_ids"]})
    bias = torch.zeros_like(base)
    bias[allowed] = beta
    return torch.log_softmax(base + bias, -1)


# --------------------------------------------------------------------------- a control from outside rcd
def test_outside_control_generates_and_scores_what_it_says(tiny_lm, monkeypatch):
    monkeypatch.syspath_prepend(str(OUTSIDE))
    from chunk_boost import ChunkBoost

    tok = tiny_lm.tokenizer
    trace: list = []
    st = Strategy("boost", datastore=FakeChunks(DOCS), control=ChunkBoost(beta=3.0), schedule=EveryN(4))
    out = Engine(tiny_lm, st, k=1, max_new_tokens=6, stop_at_eos=False, trace=trace).generate(PROMPTS)
    assert out.fired == [2, 2] and out.cost["retrievals"] == 4
    for rec in trace:
        for b, prompt in enumerate(PROMPTS):
            base = fresh_logprobs(tiny_lm, tok(prompt, add_special_tokens=False)["input_ids"] + rec["gen"][b])
            want = boost_reference(tiny_lm, base, [p.text for p in rec["passages"][b]], 3.0)
            assert torch.allclose(rec["logprobs"][b], want, atol=1e-4)
    # perplexity: positions after each firing position read the boost of the chunk retrieved there
    ids = tok("hello world, to be or not to be.", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    st = Strategy("boost", datastore=FakeChunks(DOCS), control=ChunkBoost(beta=3.0), schedule=EveryN(10))
    res = Engine(tiny_lm, st, k=1, query_tokens=4).score(ids, window=64, stride=32)
    assert res.extra["fire_positions"] == [3, 10, 20, 30] and res.fired == 4
    assert res.nll[:3] == pytest.approx(res.nll_none[:3])
    for p in range(3, len(ids) - 1):
        f = max(3, (p // 10) * 10)
        hit = st.datastore.search([tok.decode(ids[max(0, f - 3):f + 1].tolist())], 1)
        want = boost_reference(tiny_lm, fresh_logprobs(tiny_lm, ids[:p + 1].tolist()), [hit.texts[0][0]], 3.0)
        assert res.nll[p] == pytest.approx(-float(want[ids[p + 1]]), abs=1e-4), p


def _cli(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(OUTSIDE), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "rcd.run", "--config-dir", str(OUTSIDE / "conf")] + args,
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    found = sorted(Path(tmp_path / "runs").rglob("results.json"), key=lambda x: x.stat().st_mtime)
    return json.loads(found[-1].read_text())


def test_outside_control_runs_from_the_cli_with_no_rcd_edit(tmp_path):
    """`python -m rcd.run --config-dir <dir> +strategy=boost`: the LM task (perplexity + model.generate)
    and the QA task, with the class from a module on the path."""
    files = tiny_run_files(tmp_path)
    res = _cli(["+strategy=boost", f"runs_root={tmp_path / 'runs'}"] + files["lm"],
               tmp_path)
    p = res["metrics"]["perplexity"]
    assert p["retrieval_rate"] > 0 and p["perplexity"] != pytest.approx(p["perplexity_none"], rel=1e-6)
    assert "boost" in res["metrics"]["generation"] and res["samples"]["boost"]
    from test_qa_task import _setup

    qa = _cli(["+strategy=boost", "strategy.retrieval.k=1"] + _setup(tmp_path), tmp_path)
    assert qa["metrics"]["qa"]["retrievals_per_question"] >= 1 and qa["metrics"]["qa"]["questions"] == 3
    assert qa["per_example"]["examples"][0]["retrieved"] == ["wn-1"]


# --------------------------------------------------------------------------- refusals
class Empty(Control):
    pass


class NotAControl:
    def __call__(self, input_ids, scores):
        return scores


class NoApply(LogitsControl):
    accepts_units = ("chunks",)


def test_a_control_that_changes_nothing_is_refused_naming_the_methods(tiny_lm):
    for cls in (Empty, NoApply):
        with pytest.raises(ControlError, match=r"implements none of the methods.*apply\(scores.*prompt_passages"):
            check_protocol(cls)
        with pytest.raises(ControlError, match="implements none"):
            Engine(tiny_lm, Strategy("e", datastore=FakeChunks(DOCS), control=cls()))
    with pytest.raises(ControlError, match="not an rcd control: subclass rcd.control.Control"):
        Engine(tiny_lm, Strategy("e", datastore=FakeChunks(DOCS), control=NotAControl()))
    check_protocol(ContextControl)  # implements prompt_passages
    # from the config, before any model or datastore loads
    from test_run import cfg_for

    from rcd import strategy as strategy_mod

    cfg = cfg_for(["+strategy=tags", "strategy.control._target_=test_control_protocol.Empty",
                   "~strategy.control.beta", "~strategy.control.continuation"])
    with pytest.raises(strategy_mod.StrategyError, match="strategy.control._target_=test_control_protocol.Empty"):
        strategy_mod.validate(cfg)


# --------------------------------------------------------------------------- processors in model.generate
def _generate(lm, prompts, procs, n=6):
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = lm.model.generate(**enc, logits_processor=LogitsProcessorList(procs), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=tok.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:].tolist()


def test_processors_are_reused_across_generate_calls(tiny_lm):
    # kNN-LM under a schedule: the step counts from each call's prompt (a shorter second prompt used to crash)
    store = FakeStore(torch.tensor([[1.0, 2.0]]), torch.tensor([[5, 9]]))
    knn = KNNInterpolation(k=2, lmbda=0.5, temperature=1.0, datastore=store)
    proc = scheduled(knn, EveryN(3))
    with knn.attached(tiny_lm.model):
        a = _generate(tiny_lm, PROMPTS, [proc])
        assert len(store.queries) == 2  # steps 0 and 3 of 6
        short = _generate(tiny_lm, ["hi"], [proc])
        again = _generate(tiny_lm, PROMPTS, [proc])
    assert again == a and len(short) == 1 and len(store.queries) == 6
    # the engine adapter (context passages) equals the engine on every call
    eng = Engine(tiny_lm, Strategy("ctx", datastore=FakeChunks(DOCS), control=ContextControl(), schedule=EveryN(3)),
                 k=2, max_new_tokens=6, stop_at_eos=False)
    ep = eng.processor()
    want = eng.generate(PROMPTS).token_ids
    assert _generate(tiny_lm, PROMPTS, [ep]) == want
    assert _generate(tiny_lm, PROMPTS[:1], [ep]) == want[:1]
    assert _generate(tiny_lm, PROMPTS, [ep]) == want
    # the span filter: the answer starts again at each call's prompt (it used to emit eos at once)
    tok = tiny_lm.tokenizer
    span = SpanFilter(eos_token_id=tok.eos_token_id)
    span.set_evidence([[tok("to be or not", add_special_tokens=False)["input_ids"]]])
    first = _generate(tiny_lm, ["q: hello"], [span], n=4)
    assert _generate(tiny_lm, ["q: a longer question"], [span], n=4)[0][0] != tok.eos_token_id
    fresh = SpanFilter(eos_token_id=tok.eos_token_id)
    fresh.set_evidence([[tok("to be or not", add_special_tokens=False)["input_ids"]]])
    assert _generate(tiny_lm, ["q: hello"], [span], n=4) == first == _generate(tiny_lm, ["q: hello"], [fresh], n=4)


def test_a_logits_control_chains_with_transformers_processors(tiny_lm):
    tok, model = tiny_lm.tokenizer, tiny_lm.model
    tags = [tok(" be", add_special_tokens=False)["input_ids"], tok(" or", add_special_tokens=False)["input_ids"]]

    def bias():
        tb = TagBias(beta=2.0, continuation=True)
        tb.set_evidence([tags], [[1.0, 0.5]])
        return tb

    got = _generate(tiny_lm, ["to be"], [RepetitionPenaltyLogitsProcessor(2.0), bias()], n=6)[0]
    ids = torch.tensor([tok("to be", add_special_tokens=False)["input_ids"]])
    pen, tb = RepetitionPenaltyLogitsProcessor(2.0), bias()
    want = []
    with torch.no_grad():
        for _ in range(6):
            s = model(input_ids=ids).logits[:, -1].float()
            s = tb.apply(pen(ids, s), input_ids=ids)
            nxt = int(s.argmax(-1))
            want.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert got == want


# --------------------------------------------------------------------------- one key layer
def test_every_path_reads_the_key_layer_from_the_datastore(tmp_path):
    from hydra.utils import instantiate

    from test_run import cfg_for

    from rcd import strategy as strategy_mod
    from rcd.control.knn import interpolate, knn_log_probs
    from rcd.engine import windows
    from rcd.hooks import HiddenCapture
    from rcd.models import load_model
    from rcd.run import execute
    from rcd.tasks import lm as lm_task

    files = tiny_run_files(tmp_path)
    cfg = cfg_for(["+strategy=per_token", "datastore.layer=-2", f"runs_root={tmp_path / 'runs'}"] + files["lm"])
    task = execute(cfg)
    lm = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    strat = strategy_mod.build(cfg, lm, instantiate(cfg.corpus.datastore), corpus_name=cfg.corpus.name,
                               datastore_root=tmp_path / "ds")
    assert str(strat.datastore.manifest["layer"]) == "-2"
    doc = lm_task.heldout_docs(lm, instantiate(cfg.corpus.heldout), cfg.task.eval_tokens)[0]
    eng = strat.engine.score(doc["ids"], window=cfg.task.window, stride=cfg.task.stride)
    assert [round(float(x), 5) for x in eng.nll] == task["per_example"]["nll"]
    ctl, ids = strat.control, doc["ids"]

    def reference(layer):
        out = []
        for begin, end, first in windows(len(ids), cfg.task.window, cfg.task.stride):
            with torch.no_grad(), HiddenCapture(lm.model, layer) as cap:
                logits = lm.model(input_ids=ids[begin:end].view(1, -1)).logits[0, first - begin:end - 1 - begin]
                hidden = cap.hidden[0, first - begin:end - 1 - begin]
            nb = strat.datastore.search(hidden, ctl.k)
            lp = interpolate(torch.log_softmax(logits.float(), -1),
                             knn_log_probs(nb.scores, nb.tokens, logits.shape[-1], ctl.temperature, nb.metric),
                             ctl.lmbda)
            out.append(-lp.gather(1, ids[first + 1:end].view(-1, 1)).squeeze(1))
        return torch.cat(out).double().numpy()

    assert eng.nll == pytest.approx(reference(-2), abs=1e-4)
    assert eng.nll != pytest.approx(reference("final"), abs=1e-4)  # the layer matters
    proc = strat.processor()  # model.generate: the query capture sits at the same layer
    proc.attach(lm.model)
    try:
        assert ctl.capture.layer == -2 and ctl.capture.attached
    finally:
        proc.detach()
    assert not ctl.capture.attached
