"""Tokens × context (kNN-prompt style): the corpus text around the nearest token-datastore entries as passages.

When the schedule fires, the query is the hidden state, at the datastore's key layer, of the last
``query_tokens`` tokens of the row (prompt + generation; in scoring, of the text up to x_p), computed
by one forward of those tokens alone. Its k nearest entries (``k``, default the strategy's
``retrieval.k``) each give a passage: the ``before`` corpus tokens up to and including the entry's
next token and ``after`` tokens more, within its document, nearest first. The passages then enter
the prompt exactly as :class:`rcd.control.context.ContextControl`'s (re-prefill when it fires; the
same template fields and scoring).
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch

from rcd.control.context import ContextControl, Passage
from rcd.hooks import HiddenCapture, key_layer, resolve_layer


class TokenContext(ContextControl):
    """prompt = template(text around the kNN neighbours of the query state, prompt) + tokens so far."""

    name = "token_context"
    accepts_units: tuple[str, ...] = ("tokens",)

    def __init__(self, template: Optional[dict] = None, max_passages: Optional[int] = None, k: Optional[int] = None,
                 before: int = 24, after: int = 8) -> None:
        super().__init__(template=template, max_passages=max_passages)
        if (k is not None and int(k) < 1) or int(before) < 1 or int(after) < 0:
            raise ValueError(f"TokenContext: k={k} (>= 1 or null), before={before} (>= 1) and after={after} (>= 0)")
        self.k = None if k is None else int(k)
        self.before, self.after = int(before), int(after)

    def prepare(self, lm, eos_ids) -> None:
        resolve_layer(lm.model, key_layer(self.datastore))

    @torch.inference_mode()
    def neighbour_passages(self, run, queries: list[list[int]], rows: list[int], steps: list[int]
                           ) -> list[list[Passage]]:
        """The passages of each query's nearest entries (one forward of the query tokens, one search);
        ``rows``/``steps``: where each query was asked (counts and provenance)."""
        e = run.engine
        with HiddenCapture(e.model, key_layer(self.datastore)) as cap:
            e.forward_padded(queries, run.cost, keep=1)
            hidden = cap.hidden[:, -1].float()
        t0 = time.perf_counter()
        nb = self.datastore.search(hidden, self.k or e.k)
        seconds = time.perf_counter() - t0
        out = []
        for j in range(len(queries)):
            ps = []
            for i, s in zip(nb.ids[j].tolist(), nb.scores[j].tolist()):
                if i < 0:
                    continue
                text = e.decode(self.datastore.context(i, self.before, self.after))
                ps.append(Passage(text=text, doc_id=f"entry-{i}", score=float(-s if nb.metric == "l2" else s),
                                  rank=len(ps) + 1, id=int(i)))
            out.append(ps)
        run.count_retrieval(rows, [[p.doc_id for p in ps] for ps in out], seconds)
        for row, step, q, ps in zip(rows, steps, queries, out):
            run.record(row, step=int(step), query=e.decode(q), ids=[p.id for p in ps], doc_ids=[p.doc_id for p in ps],
                       scores=[p.score if math.isfinite(p.score) else None for p in ps])
        return out

    def on_fire(self, run, rows: list[int]) -> None:
        got = self.neighbour_passages(run, [run.query_ids(b) for b in rows], list(rows), [run.step_no] * len(rows))
        for b, ps in zip(rows, got):
            run.passages[b] = ps
            run.has_evidence[b] = True

    def segments(self, scorer) -> list:
        return scorer.segments(search=lambda ps: self.neighbour_passages(
            scorer, [scorer.query_ids(0, p) for p in ps], [0] * len(ps), ps))

    def __repr__(self) -> str:
        return f"TokenContext(k={self.k}, before={self.before}, after={self.after}, max_passages={self.max_passages})"
