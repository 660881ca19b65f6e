"""strategy.schedule.target_rate through the run path: θ is fitted before evaluation on a stream disjoint
from the evaluated text / questions, and results record θ, the calibration rate and the achieved rate."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_llama
from rcd.calibrate import CalibrationError, fit
from rcd.schedule import Adaptive


def test_fit_counts_forced_first_steps_toward_the_target():
    sched = Adaptive(threshold=None, target_rate=0.25, fire_at_start=True)
    conf = torch.linspace(0.01, 0.99, 99)  # 99 free steps + 1 forced step 0 = 100 steps
    rec = fit(sched, conf, forced=1, stream="scripted")
    # 25 of 100 steps fire: the forced one and the 24 least confident free ones
    assert int(sched.fires_on(conf).sum()) == 24 and rec["calibration_rate"] == pytest.approx(0.25)
    assert rec["threshold"] == sched.threshold and sched.target_rate == 0.25 and rec["calibration_steps"] == 100


def test_uncalibrated_target_rate_is_refused_not_ignored():
    sched = Adaptive(threshold=0.4, target_rate=0.1)
    sched.reset(1)
    with pytest.raises(Exception, match="target_rate=0.1 is set but θ was not calibrated"):
        sched.should_fire(1, torch.tensor([[0.5, 0.5]]), torch.tensor([3]))


def _lm_files(tmp_path, text: str):
    model, tok = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": "the cat sat on the mat. " * 20}) + "\n")
    (tmp_path / "held.jsonl").write_text(json.dumps({"text": text}) + "\n")
    return [f"model.name={tmp_path / 'm'}", "corpus=files", f"corpus.datastore.data_files={tmp_path / 'corpus.jsonl'}",
            f"corpus.heldout.data_files={tmp_path / 'held.jsonl'}", "task.window=64", "task.stride=32",
            "task.max_new_tokens=2", "task.num_prompts=1", "datastore.retriever=bm25", "datastore.chunking=record",
            f"datastore_root={tmp_path / 'ds'}", f"runs_root={tmp_path / 'runs'}", "progress=false", "leak_check.max_overlap=1.0"]


@pytest.mark.parametrize("target", [0.1, 0.3])
def test_lm_task_calibrates_on_held_out_text_after_the_evaluated_tokens(tmp_path, target):
    from test_run import cfg_for

    from rcd.run import execute

    # a scripted stream: the same line repeated, so the calibration text (after the evaluated tokens) and
    # the evaluated text give the plain model the same confidences
    text = "to be or not to be, that is the question.\n" * 40
    res = execute(cfg_for(["+strategy=adaptive", f"strategy.schedule.target_rate={target}", "task.eval_tokens=600",
                           "task.calibration_tokens=600"] + _lm_files(tmp_path, text)))
    cal = res["metrics"]["calibration"]
    assert cal["target_rate"] == target and cal["stream"].startswith("held-out text after the evaluated tokens")
    assert cal["calibration_rate"] == pytest.approx(target, abs=0.01)
    assert cal["achieved_rate"] == res["metrics"]["perplexity"]["retrieval_rate"]
    assert abs(cal["achieved_rate"] - target) <= 0.05
    assert res["inputs"] is not None and cal["threshold"] > 0


def test_qa_task_calibrates_on_questions_it_does_not_evaluate(tmp_path):
    from test_qa_task import _setup
    from test_run import cfg_for

    from rcd.run import execute

    over = [x for x in _setup(tmp_path) if not x.startswith("task.n=")]
    res = execute(cfg_for(["+strategy=adaptive", "strategy.schedule.target_rate=0.5", "strategy.retrieval.k=1",
                           "task.n=2", "task.max_new_tokens=6"] + over))
    cal = res["metrics"]["calibration"]
    assert cal["stream"].startswith("1 questions not evaluated") and 1 <= cal["calibration_steps"] <= 6
    assert abs(cal["calibration_rate"] - 0.5) <= 1 / cal["calibration_steps"]  # up to one step of rounding
    assert cal["achieved_rate"] == res["metrics"]["qa"]["retrieval_rate"]
    with pytest.raises(CalibrationError, match="every question of task.path is evaluated"):
        execute(cfg_for(["+strategy=adaptive", "strategy.schedule.target_rate=0.5", "task.n=null", "force=true"]
                        + over))


def test_a_run_whose_adaptive_trigger_never_fires_warns_and_records_it(tmp_path, caplog):
    """The task logs the schedule's rate at the end (Schedule.log_stats) and Adaptive.check_rate warns when
    the trigger is degenerate: θ=0 with max_prob never fires (no probability is below 0)."""
    import logging

    from test_run import cfg_for

    from rcd.run import execute

    text = "to be or not to be, that is the question.\n" * 20
    with pytest.warns(RuntimeWarning, match="fired 0 of .* the trigger is degenerate"), \
            caplog.at_level(logging.INFO, logger="rcd.schedule.base"):
        res = execute(cfg_for(["+strategy=adaptive", "strategy.schedule.threshold=0.0",
                               "strategy.schedule.fire_at_start=false", "task.eval_tokens=200",
                               "task.generate=false"] + _lm_files(tmp_path, text)))
    sched = res["metrics"]["schedule"]
    assert sched["fired"] == 0 and sched["asked"] >= 20 and sched["retrieval_rate"] == 0.0
    assert any("retrieval rate 0.0000 (0 of " in r.getMessage() for r in caplog.records)
