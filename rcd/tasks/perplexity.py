"""Perplexity of a text, plain and under a strategy: a thin front to :class:`rcd.engine.scoring.Scorer`.

The text's tokens are read in sliding windows (:func:`windows`); every task that scores text
(the LM task, the lm-eval backend, the kNN grid) goes through the one scorer, so a control's
perplexity is computed by the same code whichever task asks (see :mod:`rcd.engine.scoring`).

    PPL = exp(mean_t NLL_t)       bits/byte = Σ_t NLL_t / (ln 2 · bytes of the scored text)
"""
from __future__ import annotations

import torch

from rcd.engine.scoring import PerplexityResult, windows

__all__ = ["PerplexityResult", "windows", "score"]


def score(lm, token_ids: torch.Tensor, control=None, schedule=None, *, window: int = 512, stride: int = 256,
          engine=None) -> PerplexityResult:
    """Per-token NLL of ``token_ids`` [n] under the plain model and under ``control`` with ``schedule``
    (or under ``engine``'s strategy; a strategy's engine carries its template and retrieval settings)."""
    if engine is None:
        from rcd.engine import Engine
        from rcd.strategy import Strategy

        strat = None if control is None else Strategy("custom", datastore=getattr(control, "datastore", None),
                                                       control=control, schedule=schedule)
        engine = Engine(lm, strat, max_new_tokens=1)
    return engine.score(token_ids, window=window, stride=stride)
