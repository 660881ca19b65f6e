"""The control protocol: what a control ("how" axis) tells the engine it needs and does.

The engine (:mod:`rcd.engine`) is generic: it never asks which control it runs. It calls the
methods below, each with a default that does nothing, so a control implements only what it does.
Generation (one :class:`rcd.engine.decoding.Decoding` per batch, called ``run`` here):

==========================  =====================================================================
``prepare(lm, eos_ids)``    start-up: check the model can take the control (before decoding)
``begin(run)``              a new call starts: reset per-call state
``attach(model, run)``      register forward hooks for this call; ``detach()`` removes them
``on_fire(run, rows)``      the schedule fired for ``rows``: retrieve (``run.retrieve(rows)``, a
                            text query) and keep the evidence (default: :meth:`take`)
``take(run, rows, hits)``   evidence of a text-query search (default: ``passages(run, hits, j)``
                            into ``run.passages``)
``views(k)``                forward views per row (REPLUG: one per document; default 1)
``prompt_passages(run, b)`` per view, the passages rendered into row b's prompt (context)
``kv_prefix(run, rows, c)`` an injected KV cache prefix for ``rows`` (``PrefixKV``) or None
``before_forward(firing)``  called before each forward with the views whose schedule fired
``logprobs(run, l, fire)``  the next-token log-probabilities from the logits ``l`` [R, V]
``after_step(run, rows)``   rows that finished their generation (eos or length; verify checks)
``step_budget(max_new)``    most decoding steps one call may take (verify regenerates: more)
==========================  =====================================================================

Flags: ``retrieves_itself`` (the control searches inside its own ``apply``/hooks, the engine
only counts firings), ``rebuilds_prompt`` (new evidence changes the prompt or cache prefix: the
firing rows are re-prefilled, each keeping its cached KV up to its first changed token),
``acts_in_forward`` (hooks change the forward pass: a step whose logits were computed before the
schedule decided is recomputed, and a re-prefill recomputes the whole row, since KV cached under
other hook settings is not valid; set it on any control whose hooks change hidden states or
attention), ``rolls_back`` (the control takes back emitted tokens, impossible inside
``model.generate``).

Scoring a fixed text (:class:`rcd.engine.scoring.Scorer`, the one perplexity path):
``score_window(scorer, win)`` returns the NLL of one window's positions from the plain forward's
logits (kNN-LM, tag bias), and ``score_after(scorer)`` the NLL of every position after the plain
pass (context, REPLUG, KV injection, kNN attention). ``None`` keeps the plain NLL.

A control that overrides none of :data:`ACTIONS` cannot change what the model computes and is
refused at start-up (:func:`check_protocol`), as is a class that is not a :class:`Control`.
``run`` and ``scorer`` share an evidence surface (``passages``, ``has_evidence``, ``retrieve``,
``record``, ``engine``, ``step_no``, ``cost``; see :mod:`rcd.engine.decoding`), so an evidence-driven
logits control scores a text with the same ``on_fire`` / ``take`` / ``apply`` it generates with
(:meth:`LogitsControl.score_window`).

:class:`LogitsControl` is also a transformers ``LogitsProcessor`` so it runs inside
``model.generate``: ``apply(scores, input_ids, hidden, fire)`` returns normalised
log-probabilities [N, V] (rows where ``fire`` is False come back as ``log_softmax(scores)``);
``__call__`` is a thin adapter over ``apply``. A processor's per-call state is reset when a new
``generate`` call starts (:class:`CallTracker`).
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Any, Optional, Sequence

from contextlib import contextmanager

import torch
from transformers import LogitsProcessor

from rcd.errors import RcdError

#: methods through which a control changes generation; a control must override at least one
ACTIONS = ("prompt_passages", "kv_prefix", "logprobs", "apply", "attach", "after_step")


class ControlError(RcdError):
    pass


class Control:
    """Base of every control (see the module table). Every method has a do-nothing default."""

    #: the "what" units this control can consume (validated at start-up)
    accepts_units: tuple[str, ...] = ()
    #: the label of this control in provenance records (default: the class name)
    name: Optional[str] = None
    #: the "how" family on the grid: "context" (the prompt), "inject" (the model's computation), "logits"
    how: str = "logits"
    #: why this control cannot score a fixed text (None: it can); the scorer refuses with this message
    score_refusal: Optional[str] = None
    retrieves_itself: bool = False
    rebuilds_prompt: bool = False
    acts_in_forward: bool = False
    rolls_back: bool = False
    datastore: Any = None

    # ---------------------------------------------------------------- life cycle
    def bind(self, datastore=None, **_: Any) -> "Control":
        if datastore is not None:
            self.datastore = datastore
        return self

    def prepare(self, lm, eos_ids: Sequence[int]) -> None:
        """Start-up check against the model (raise an RcdError naming the fix)."""

    def template(self, base):
        """The prompt template the engine renders with (default: the task's)."""
        return base

    def begin(self, run) -> None:
        """A new decoding call (or scored text) starts: reset per-call state."""

    def attach(self, model, run=None) -> "Control":
        """Register this control's forward hooks (none by default)."""
        return self

    def detach(self) -> None:
        """Remove every hook :meth:`attach` registered."""

    @contextmanager
    def attached(self, model, run=None):
        """``with control.attached(model): model.generate(..., logits_processor=[control])``."""
        self.attach(model, run)
        try:
            yield self
        finally:
            self.detach()

    # ---------------------------------------------------------------- evidence
    def on_fire(self, run, rows: list[int]) -> None:
        hits = run.retrieve(rows)
        self.take(run, rows, hits)

    def passages(self, run, hits, j: int) -> list:
        """Row ``j`` of a text-query search as the passages this control keeps (default: chunk hits)."""
        from rcd.control.context import passages_from_hits

        return passages_from_hits(hits, j)

    def take(self, run, rows: list[int], hits) -> None:
        for j, b in enumerate(rows):
            run.passages[b] = self.passages(run, hits, j)
            run.has_evidence[b] = True

    def step_budget(self, max_new: int) -> int:
        """Most decoding steps one call may take (a control that regenerates needs more)."""
        return max_new + 1

    # ---------------------------------------------------------------- what the model reads
    def views(self, k: int) -> int:
        return 1

    def prompt_passages(self, run, row: int) -> list[Sequence]:
        return [()]

    def kv_prefix(self, run, rows: Sequence[int], cost: dict):
        return None

    def before_forward(self, firing: Optional[torch.Tensor]) -> None:
        pass

    # ---------------------------------------------------------------- next-token distribution
    def logprobs(self, run, logits: torch.Tensor, fire: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits, -1)

    def after_step(self, run, rows: list[int]) -> None:
        """``rows`` finished their generation (eos, or ``max_new_tokens``) at this step."""

    # ---------------------------------------------------------------- scoring a fixed text
    def score_window(self, scorer, win) -> Optional[torch.Tensor]:
        return None

    def score_after(self, scorer) -> Optional[torch.Tensor]:
        return None


def check_protocol(cls) -> None:
    """Refuse, at start-up, a control class that is not a :class:`Control` or implements nothing the
    engine calls (it would leave every output and perplexity equal to the plain model's)."""
    label = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)}"
    if not (isinstance(cls, type) and issubclass(cls, Control)):
        raise ControlError(f"control {label} is not an rcd control: subclass rcd.control.Control (or "
                           "rcd.control.LogitsControl for a logits processor) and implement its protocol "
                           "(see rcd.control.base)")
    base = Control
    if issubclass(cls, LogitsControl):
        if not getattr(cls.apply, "__isabstractmethod__", False):
            return
        base = LogitsControl
    for name in ACTIONS:
        if name != "apply" and getattr(cls, name) is not getattr(base, name):
            return
    raise ControlError(
        f"control {label} implements none of the methods the engine calls, so it would change nothing: "
        f"implement apply(scores, *, input_ids, hidden, fire) (a LogitsControl), logprobs(run, logits, fire), "
        f"prompt_passages(run, row) (passages into the prompt), kv_prefix(run, rows, cost) (a KV prefix), "
        f"attach(model, run) (forward hooks) or after_step(run, rows); see rcd.control.base")


class CallTracker:
    """Tells a LogitsProcessor when ``model.generate`` starts a new call: the batch size changed, or
    ``input_ids`` is not the previous ``input_ids`` plus one token."""

    def __init__(self) -> None:
        self.prev: Optional[torch.Tensor] = None
        self.prompt_len = 0

    def new_call(self, input_ids: torch.Tensor) -> bool:
        prev, self.prev = self.prev, input_ids.detach()
        new = (prev is None or prev.shape[0] != input_ids.shape[0] or prev.shape[1] + 1 != input_ids.shape[1]
               or not torch.equal(prev.to(input_ids.device), input_ids[:, :-1]))
        if new:
            self.prompt_len = int(input_ids.shape[1])
        return new

    def step(self, input_ids: torch.Tensor) -> int:
        return int(input_ids.shape[1]) - self.prompt_len


class LogitsControl(Control, LogitsProcessor):
    """Turns model scores into retrieval-controlled log-probabilities: apply(s) -> log p'."""

    @abstractmethod
    def apply(
        self,
        scores: torch.Tensor,
        *,
        input_ids: Optional[torch.Tensor] = None,
        hidden: Optional[torch.Tensor] = None,
        fire: Optional[torch.Tensor] = None,
        **state: Any,
    ) -> torch.Tensor:
        """Return log p' of shape [N, V] (see module docstring)."""

    def reset_call(self) -> None:
        """Per-call state to clear when ``model.generate`` starts a new call (none by default)."""

    # ``LogitsProcessor`` entry point used by ``model.generate``.
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tracker = self.__dict__.setdefault("_calls", CallTracker())
        if tracker.new_call(input_ids):
            self.reset_call()
        return self.apply(scores, input_ids=input_ids, hidden=self.current_hidden(), fire=None)

    def current_hidden(self) -> Optional[torch.Tensor]:
        """Query vectors for the rows being generated (last position), if a capture is attached."""
        capture = getattr(self, "capture", None)
        if capture is None or capture.hidden is None:
            return None
        return capture.hidden[:, -1]

    def logprobs(self, run, logits: torch.Tensor, fire: torch.Tensor) -> torch.Tensor:
        """Default for evidence-driven processors: apply on the rows that hold evidence, with the
        tokens generated so far as ``input_ids``."""
        if not bool(run.has_evidence.any()):
            return torch.log_softmax(logits, -1)
        return self.apply(logits, input_ids=run.generated_ids(), fire=run.has_evidence.to(logits.device))

    def score_window(self, scorer, win) -> Optional[torch.Tensor]:
        """Default for evidence-driven processors: at each firing position take the evidence
        (:meth:`on_fire`, as in generation); positions holding evidence get ``apply`` of the plain
        logits (no generated tokens: ``input_ids=None``), the others keep the plain NLL."""
        out = win.nll_none.clone()
        a = win.first
        for p in list(win.fires) + [win.end - 1]:
            if p > a and bool(scorer.has_evidence[0]):
                rows = win.rows(a, p)
                lp = self.apply(win.logits[rows], input_ids=None, fire=None)
                out[rows] = -lp.gather(1, win.targets[rows].view(-1, 1)).squeeze(1).double().cpu()
            if p < win.end - 1:
                scorer.step_no = p
                self.on_fire(scorer, [0])
            a = p
        return out


def masked_rows(new: torch.Tensor, base: torch.Tensor, fire: Optional[torch.Tensor]) -> torch.Tensor:
    """Take ``new`` on rows where ``fire`` is True and ``base`` elsewhere (``fire=None``: all new)."""
    if fire is None:
        return new
    return torch.where(fire.to(new.device).view(-1, 1), new, base)
