"""Calibration of a rate-targeted schedule (``strategy.schedule.target_rate``) before evaluation.

With ``target_rate`` set, θ of :class:`rcd.schedule.Adaptive` is fitted on a *calibration stream*
disjoint from what is evaluated, then kept fixed for the evaluation:

* ``task=lm``: the held-out tokens that follow the evaluated ones in each held-out document
  (``task.calibration_tokens`` of them, in spans of two windows spread evenly over the rest of each
  document), read by the plain model: the same p_t the scorer decides on;
* ``task=qa``: the questions after the evaluated ones (``task.calibration_questions`` of those the
  task's filter keeps and its sample left out), decoded by the strategy's engine with retrieval
  at step 0 only (so p_t already sees the first evidence, as in the evaluated run).

The retrieval rate is the share of decoding steps (positions) where retrieval fires, forced
step-0 firings (``fire_at_start``) included: θ is set so the free steps fire at
(target · N - forced) / (N - forced). Results record ``threshold``, ``target_rate``,
``calibration_rate`` (on the calibration stream), ``achieved_rate`` (on the evaluation) and the stream.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from rcd.errors import RcdError


class CalibrationError(RcdError):
    pass


def wants_calibration(schedule) -> bool:
    return schedule is not None and getattr(schedule, "target_rate", None) is not None and hasattr(schedule, "calibrate")


def fit(schedule, confidences: torch.Tensor, forced: int, stream: str) -> dict:
    """Set θ on ``confidences`` of the free steps (``forced`` steps fire anyway); the record."""
    target = float(schedule.target_rate)
    free_n = int(confidences.numel())
    total = free_n + forced
    if free_n == 0:
        raise CalibrationError(f"the calibration stream ({stream}) has no decoding step to calibrate on")
    free_rate = min(1.0, max(0.0, (target * total - forced) / free_n))
    theta = schedule.calibrate(confidences, free_rate)
    schedule.target_rate = target  # calibrate() stored the free-step rate
    fired = int(schedule.fires_on(confidences).sum()) + forced
    return {"target_rate": target, "threshold": theta, "calibration_rate": fired / total, "calibration_steps": total,
            "stream": stream}


@torch.inference_mode()
def lm_confidences(lm, schedule, docs: list[torch.Tensor], window: int, stride: int) -> tuple[torch.Tensor, int]:
    """Plain-model confidences at every position of ``docs`` (position 0 is forced with fire_at_start)."""
    from rcd.engine.scoring import windows

    out, forced = [], 0
    for ids in docs:
        ids = ids.to(lm.device).view(-1)
        if ids.numel() < 2:
            continue
        for begin, end, first in windows(ids.numel(), window, stride):
            logits = lm.model(input_ids=ids[begin:end].view(1, -1), use_cache=False).logits[0].float()
            probs = torch.log_softmax(logits[first - begin:end - 1 - begin], -1).exp().cpu()
            conf = schedule.confidence(probs)
            if first == 0 and schedule.fire_at_start:
                conf, forced = conf[1:], forced + 1
            out.append(conf)
    return (torch.cat(out) if out else torch.zeros(0)), forced


def calibrate_lm(cfg, lm, strategy, heldout_docs: list[dict]) -> Optional[dict]:
    """θ from the held-out text after the evaluated tokens (module doc); None without target_rate."""
    sched = getattr(strategy, "schedule", None)
    if not wants_calibration(sched):
        return None
    t = cfg.task
    budget = int(t.get("calibration_tokens") or 4096)
    rests = [d["text"][d["offset_chars"]:] for d in heldout_docs]
    rests = [lm.tokenizer(r, add_special_tokens=False)["input_ids"] for r in rests if r.strip()]
    if not any(len(r) >= 2 for r in rests):
        raise CalibrationError("strategy.schedule.target_rate is set, but the held-out documents hold no text after "
                               "the evaluated tokens to calibrate on: lower task.eval_tokens, or set "
                               "strategy.schedule.target_rate=null and a threshold")
    docs = spans(rests, budget, 2 * int(t.window))
    conf, forced = lm_confidences(lm, sched, docs, int(t.window), int(t.stride))
    return fit(sched, conf, forced, f"held-out text after the evaluated tokens ({sum(len(d) for d in docs)} tokens in "
                                    f"{len(docs)} spans over {len(rests)} documents)")


def spans(docs: list[list[int]], budget: int, span: int) -> list[torch.Tensor]:
    """About ``budget`` tokens of ``docs`` as spans of ``span`` tokens spread evenly over each document
    (the budget shared evenly between documents), so the stream samples all of the text, not its start."""
    out = []
    share = max(2, budget // max(1, len(docs)))
    for ids in docs:
        if len(ids) <= share:
            out.append(torch.tensor(ids))
            continue
        n = max(1, -(-share // span))
        size = share // n
        gap = (len(ids) - size) / max(1, n - 1) if n > 1 else 0
        for j in range(n):
            s0 = int(round(j * gap))
            out.append(torch.tensor(ids[s0:s0 + size]))
    return [x for x in out if x.numel() >= 2]


@torch.inference_mode()
def engine_confidences(engine, schedule, requests: list) -> tuple[torch.Tensor, int]:
    """Confidences at every decoding step of ``requests`` under ``engine`` with retrieval at step 0 only."""
    from rcd.schedule import Once

    saved, saved_trace = engine.schedule, engine.trace
    trace: list = []
    engine.schedule, engine.trace = (Once() if schedule.fire_at_start else None), trace
    try:
        engine.generate(requests)
    finally:
        engine.schedule, engine.trace = saved, saved_trace
    out, forced = [], 0
    for rec in trace:
        step = rec["step"]
        if "top_logprob" in rec:  # engine=vllm: one record per row and step, max_v p_v only (probs_read="max")
            if step == 0 and schedule.fire_at_start:
                forced += 1
            else:
                out.append(schedule.confidence(torch.tensor([[math.exp(rec["top_logprob"])]])))
            continue
        active = [b for b, g in enumerate(rec["gen"]) if len(g) == step]
        if not active:
            continue
        if step == 0 and schedule.fire_at_start:
            forced += len(active)
            continue
        out.append(schedule.confidence(rec["logprobs"][active].exp()))
    return (torch.cat(out) if out else torch.zeros(0)), forced


def calibrate_qa(engine, strategy, examples: list[dict], candidates: list[dict], to_requests, limit: int = 32
                 ) -> Optional[dict]:
    """θ from up to ``limit`` of the ``candidates`` whose question is not among the evaluated ``examples``
    (module doc; ``to_requests(examples)`` renders them as the task does); None without target_rate."""
    sched = getattr(strategy, "schedule", None)
    if not wants_calibration(sched):
        return None
    used = {ex["question"] for ex in examples}
    calib = [ex for ex in candidates if ex["question"] not in used][: int(limit)]
    if not calib:
        raise CalibrationError("strategy.schedule.target_rate is set, but every question of task.path is evaluated: "
                               "nothing is left to calibrate on; lower task.n, or set "
                               "strategy.schedule.target_rate=null and a threshold")
    conf, forced = engine_confidences(engine, sched, to_requests(calib))
    return fit(sched, conf, forced, f"{len(calib)} questions not evaluated (the strategy, retrieval at step 0 only)")
