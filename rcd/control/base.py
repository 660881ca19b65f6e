"""Base of the "how = logits" axis: controls that act on next-token scores.

A :class:`LogitsControl` is a transformers ``LogitsProcessor`` so it runs inside
``model.generate``; it also exposes :meth:`LogitsControl.apply`, which the perplexity
scorer and rcd's own decoding engine call on many positions at once. ``__call__`` is a thin
adapter over ``apply``, so generation and scoring run the same arithmetic.

Conventions
-----------
* ``scores`` are log-probabilities or logits of shape ``[N, V]`` (N rows: batch rows in
  generation, flattened positions in scoring). Every control returns *normalised
  log-probabilities* ``[N, V]`` so controls can be chained and perplexity read off directly.
* ``fire`` is an optional bool mask ``[N]``: rows where the schedule fired. Rows where it did
  not fire must come back as ``log_softmax(scores)`` unchanged.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional

import torch
from transformers import LogitsProcessor


class LogitsControl(LogitsProcessor, ABC):
    """Turns model scores into retrieval-controlled log-probabilities: apply(s) -> log p'."""

    #: the "what" units this control can consume (validated at start-up)
    accepts_units: tuple[str, ...] = ()

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

    # ``LogitsProcessor`` entry point used by ``model.generate``.
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.apply(scores, input_ids=input_ids, hidden=self.current_hidden(), fire=None)

    def current_hidden(self) -> Optional[torch.Tensor]:
        """Query vectors for the rows being generated (last position), if a capture is bound."""
        capture = getattr(self, "capture", None)
        if capture is None or capture.hidden is None:
            return None
        return capture.hidden[:, -1]


def masked_rows(new: torch.Tensor, base: torch.Tensor, fire: Optional[torch.Tensor]) -> torch.Tensor:
    """Take ``new`` on rows where ``fire`` is True and ``base`` elsewhere (``fire=None``: all new)."""
    if fire is None:
        return new
    return torch.where(fire.to(new.device).view(-1, 1), new, base)
