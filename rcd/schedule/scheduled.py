"""A logits control under a schedule, as one transformers LogitsProcessor (:func:`scheduled`).

At each ``model.generate`` step the schedule says which rows fire (from the step number, the
plain next-token probabilities when it reads them, and the last token); the control acts on those
rows only. The step number counts from the prompt of the current call: a new call (new batch, or
``input_ids`` that do not extend the previous ones by one token) resets the schedule and the
control's per-call state (:class:`rcd.control.base.CallTracker`).
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import LogitsProcessor

from rcd.control.base import CallTracker


class ScheduledControl(LogitsProcessor):
    """``control.apply(scores, fire=schedule.should_fire(step, p, last))`` per ``generate`` step."""

    def __init__(self, control, schedule) -> None:
        self.control, self.schedule = control, schedule
        self.calls = CallTracker()

    def bind(self, **kwargs) -> "ScheduledControl":
        self.control.bind(**kwargs)
        return self

    def attach(self, model, run=None) -> "ScheduledControl":
        self.control.attach(model, run)
        return self

    def detach(self) -> None:
        self.control.detach()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.calls.new_call(input_ids):
            self.schedule.reset(input_ids.shape[0])
            self.control.reset_call()
        step = self.calls.step(input_ids)
        probs = torch.softmax(scores.float(), -1) if self.schedule.needs_probs else None
        last = input_ids[:, -1] if step > 0 else None
        fire = self.schedule.should_fire(step, probs, last)
        return self.control.apply(scores, input_ids=input_ids, hidden=self.control.current_hidden(), fire=fire)


def scheduled(control, schedule: Optional[object] = None):
    """``control`` as a LogitsProcessor that fires on ``schedule``'s steps (every step when None or
    ``every_token``: the control itself)."""
    if schedule is None or getattr(schedule, "name", "") == "every_token":
        return control
    return ScheduledControl(control, schedule)
