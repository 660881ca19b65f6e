"""The ``model.generate`` adapter: a strategy as a transformers LogitsProcessor.

:func:`processor_for` picks the cheapest faithful form:

* a logits control that retrieves by itself and leaves the forward pass alone (kNN-LM) runs
  as itself inside ``generate`` (wrapped with its schedule, :func:`rcd.schedule.scheduled`);
  its hooks (the query capture) attach with ``processor.attach(model)`` / ``detach()``;
* every other control runs through :class:`EngineProcessor`: the engine's own cache produces
  the strategy's log-probabilities and ``generate`` picks from them (one extra forward per step).

Both reset their per-call state when ``generate`` starts a new call
(:class:`rcd.control.base.CallTracker`), so one processor serves many calls.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from rcd.control.base import CallTracker, LogitsControl
from rcd.engine.decoding import Decoding


def processor_for(engine):
    """The LogitsProcessor that runs ``engine``'s strategy inside ``model.generate`` (None: plain)."""
    c = engine.control
    if c is None:
        return None
    if isinstance(c, LogitsControl) and c.retrieves_itself and not c.acts_in_forward:
        from rcd.schedule import scheduled

        return scheduled(c, engine.schedule)
    return EngineProcessor(engine)


class EngineProcessor:
    """Runs the engine inside ``model.generate``: a LogitsProcessor that replaces the plain scores.

    The prompts are read back from ``input_ids`` (left padding dropped). Prompts the caller rendered with the
    model's chat template are unwrapped to their user message and rendered as the engine renders them (the
    passages inside the user turn, :meth:`rcd.control.context.PromptTemplate.unwrap`); other prompts are read
    as raw text, passages before them. A control that ``rolls_back``
    (verify) cannot take back an emitted sentence here: it checks and logs ("reject_kept");
    :meth:`rcd.engine.Engine.generate` regenerates.
    """

    def __init__(self, engine) -> None:
        c = engine.control
        if c is not None and c.rolls_back:
            warnings.warn(f"{type(c).__name__} inside model.generate checks and logs each sentence but cannot take "
                          "back a rejected one (logged as 'reject_kept'); rcd.engine.Engine.generate regenerates it",
                          RuntimeWarning, stacklevel=3)
        self.engine = engine
        self.run: Optional[Decoding] = None
        self.calls = CallTracker()

    def attach(self, model=None, run=None) -> "EngineProcessor":
        return self  # the control's hooks attach around each engine forward (see __call__)

    def detach(self) -> None:
        pass

    def _start(self, input_ids: torch.Tensor) -> None:
        e = self.engine
        prompts = []
        for row in input_ids.tolist():
            i = 0
            while i < len(row) - 1 and row[i] == e.pad_id:
                i += 1
            prompts.append(e.tok.decode(row[i:], skip_special_tokens=False))
        from rcd.engine.core import Request

        # a prompt the caller wrapped in the chat template is unwrapped, so passages land inside the user turn as
        # in Engine.generate; any other prompt is read as raw text (passages before it)
        users = [e.template.unwrap(e.tok, p) for p in prompts]
        if all(u is not None for u in users):
            reqs, template = [Request(prompt=u) for u in users], e.template
        else:
            reqs, template = [Request(prompt=p) for p in prompts], e.template.updated({"chat": "never", "system": None})
        self.run = Decoding(e, reqs, max_new=10 ** 9, template=template, in_generate=True)
        if e.schedule is not None:
            e.schedule.reset(len(prompts), device=torch.device("cpu"))

    @torch.inference_mode()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        e = self.engine
        if self.calls.new_call(input_ids) or self.run is None:
            self._start(input_ids)
        else:
            r = self.run
            tok = input_ids[:, -1].cpu()
            for b in range(r.B):
                r.gen[b].append(int(tok[b]))
            r.step_no += 1
            if r.state is not None:
                r.pending = tok
        r = self.run
        c = e.control
        if c is not None:
            c.attach(e.model, r)
        try:
            fire = r.decide_and_act()
            r.ensure_logits()
            return r.logprobs(fire).to(scores.dtype)
        finally:
            if c is not None:
                c.detach()
