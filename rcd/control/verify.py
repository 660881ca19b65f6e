"""Verify: check each finished sentence against retrieved evidence; reject and regenerate unsupported ones.

Support of a sentence s against evidence passages E, given the prompt q (words the prompt already
states are not claims of the sentence)::

    W(x)       = lower-cased word tokens (\\w+) of x, minus stop words
    C(s)       = W(s) \\ W(q)                      (the sentence's own content words)
    support(s) = |C(s) ∩ W(E)| / |C(s)|            (1 when C(s) is empty: nothing to check)

Decision (logged with the support by the engine): ``accept`` when support ≥ θ; otherwise
``reject`` while the sentence has been retried fewer than ``max_retries`` times, else
``accept_max_retries`` (the last attempt is kept).

On ``reject`` the engine rolls the row back to the sentence start and regenerates it:

* the rejected token sequence r is banned from being produced again — at position j of the
  regenerated sentence, if the tokens so far equal r[:j], the token r[j] gets log-prob -inf
  (so the same sentence cannot come back, and nothing else is constrained);
* ``regenerate="evidence"`` also places the evidence passages in the row's prompt (re-prefill)
  for the rest of the generation; ``regenerate="ban"`` keeps the prompt as it was.

The ban is applied by :meth:`Verify.apply`, a LogitsControl over the rows' generated tokens.
In the engine the schedule's firings after step 0 (the sentence schedule: each sentence end) and
each row's end (:meth:`Verify.after_step`) check the sentence just finished; step 0 retrieves
evidence for the prompt. A fixed text has nothing to regenerate: its perplexity is the plain
model's (with a note in the result).
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import torch

from rcd.control.base import LogitsControl
from rcd.control.context import merge_passages, passages_from_hits

STOPWORDS = frozenset("""
a an the and or but if then else of in on at to for from by with without about into onto over under as is are was
were be been being am do does did doing have has had having it its it's this that these those there here he she they
we you i me him her them us my your his their our mine yours what which who whom whose when where why how not no nor
so than too very can could would should will shall may might must just also only s t
""".split())

REGENERATE = ("evidence", "ban")


def words(text: str, stopwords: frozenset = STOPWORDS) -> list[str]:
    """Lower-cased word tokens of ``text`` without stop words."""
    return [w for w in re.findall(r"\w+", text.lower()) if w not in stopwords]


class Verify(LogitsControl):
    """support(s) = |C(s) ∩ W(E)| / |C(s)|; reject below θ, roll back, ban the sentence, regenerate."""

    name = "verify"
    accepts_units = ("chunks", "latent")
    rolls_back = True

    def __init__(self, threshold: float = 0.5, max_retries: int = 2, regenerate: str = "evidence",
                 stopwords: Optional[Sequence[str]] = None) -> None:
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"Verify: threshold is a share of supported words in [0, 1], got {threshold}")
        if int(max_retries) < 0:
            raise ValueError(f"Verify: max_retries must be >= 0, got {max_retries}")
        if regenerate not in REGENERATE:
            raise ValueError(f"Verify: regenerate must be one of {REGENERATE}, got {regenerate!r}")
        self.threshold = float(threshold)
        self.max_retries = int(max_retries)
        self.regenerate = regenerate
        self.stopwords = STOPWORDS if stopwords is None else frozenset(w.lower() for w in stopwords)
        self.bans: dict[int, dict[int, list[list[int]]]] = {}
        self.datastore = None

    # ------------------------------------------------------------------ engine protocol
    def begin(self, run) -> None:
        self.bans = {}
        self.sent_start = [0] * run.B
        self.retries = [0] * run.B
        self.in_context = [False] * run.B  # regenerate=evidence: the row's passages are in its prompt

    def step_budget(self, max_new: int) -> int:
        return max_new * (1 + self.max_retries) + 1

    def on_fire(self, run, rows: list[int]) -> None:
        if run.step_no > 0:
            self.verify_rows(run, rows, at_end=False)
        else:
            super().on_fire(run, rows)

    def after_step(self, run, rows: list[int]) -> None:
        self.verify_rows(run, rows, at_end=True)

    def prompt_passages(self, run, row: int) -> list:
        return [run.passages[row] if self.in_context[row] else ()]

    def logprobs(self, run, logits: torch.Tensor, fire: torch.Tensor) -> torch.Tensor:
        return self.apply(logits, gen=run.gen)

    def score_window(self, scorer, win):
        return None

    def score_after(self, scorer) -> torch.Tensor:
        scorer.extra["note"] = ("verify acts on generated sentences (reject and regenerate); a fixed text has "
                                "nothing to regenerate, so its perplexity is the plain model's")
        scorer.fires = []
        return scorer.nll_none.clone()

    def verify_rows(self, run, rows: list[int], at_end: bool) -> bool:
        """Check the sentence each row just finished; roll back rejected ones. True if any was rejected."""
        e = run.engine
        sentences = {}
        for b in rows:
            end = len(run.gen[b])
            if at_end and end and run.gen[b][-1] in e.eos_ids:
                end -= 1
            sent = run.gen[b][self.sent_start[b]:end]
            if re.search(r"\w", e.decode([t for t in sent if t not in e.eos_ids])):
                sentences[b] = sent
        rows = [b for b in rows if b in sentences]
        if not rows:
            return False
        hits = run.retrieve(rows, sentences)
        rejected = False
        for j, b in enumerate(rows):
            run.passages[b] = merge_passages(run.passages[b], passages_from_hits(hits, j))
            text = e.decode(sentences[b])
            decision, support = self.judge(text, [p.text for p in run.passages[b]], self.retries[b],
                                           given=run.reqs[b].query or run.reqs[b].prompt)
            if decision == "reject" and run.in_generate:
                decision = "reject_kept"  # inside model.generate an emitted sentence cannot be taken back
            run.record(b, event="verify", sentence=text, support=support, decision=decision, retry=self.retries[b],
                       evidence=[p.doc_id for p in run.passages[b]])
            if decision == "reject":
                rejected = True
                start = self.sent_start[b]
                self.ban(b, start, sentences[b])
                self.retries[b] += 1
                if self.regenerate == "evidence":
                    self.in_context[b] = True
                run.roll_back(b, start)  # re-prefilled (with the evidence in context)
            else:
                self.sent_start[b] = len(run.gen[b]) - (1 if at_end else 0)
                self.retries[b] = 0
                self.clear(b)
        return rejected

    # ------------------------------------------------------------------ judging
    def support(self, sentence: str, evidence: Sequence[str], given: str = "") -> float:
        claims = set(words(sentence, self.stopwords)) - set(words(given, self.stopwords))
        if not claims:
            return 1.0
        known = set()
        for text in evidence:
            known.update(words(text, self.stopwords))
        return len(claims & known) / len(claims)

    def judge(self, sentence: str, evidence: Sequence[str], retry: int, given: str = "") -> tuple[str, float]:
        """(decision, support) for a finished sentence on its ``retry``-th attempt (0 = first)."""
        s = self.support(sentence, evidence, given)
        if s >= self.threshold:
            return "accept", s
        if retry >= self.max_retries:
            return "accept_max_retries", s
        return "reject", s

    # ------------------------------------------------------------------ bans
    def ban(self, row: int, start: int, tokens: Sequence[int]) -> None:
        """Forbid row ``row`` to produce ``tokens`` again from position ``start`` of its generation."""
        if len(tokens) == 0:
            return
        self.bans.setdefault(int(row), {}).setdefault(int(start), []).append([int(t) for t in tokens])

    def clear(self, row: Optional[int] = None) -> None:
        if row is None:
            self.bans = {}
        else:
            self.bans.pop(int(row), None)

    def banned(self, row: int, gen: Sequence[int]) -> set[int]:
        """Tokens row ``row`` may not emit next, given its generated tokens ``gen``."""
        out: set[int] = set()
        for start, seqs in self.bans.get(int(row), {}).items():
            if len(gen) < start:
                continue
            prefix = list(gen[start:])
            j = len(prefix)
            for r in seqs:
                if j < len(r) and r[:j] == prefix:
                    out.add(r[j])
        return out

    def apply(self, scores: torch.Tensor, *, input_ids=None, hidden=None, fire=None,
              gen: Optional[Sequence[Sequence[int]]] = None, **_: Any) -> torch.Tensor:
        """log_softmax(scores) with each row's banned tokens at -inf (``gen``: tokens per row)."""
        base = torch.log_softmax(scores.float(), dim=-1)
        if not self.bans:
            return base
        if gen is None:
            if input_ids is None:
                raise ValueError("Verify.apply needs the generated tokens (gen=) or input_ids")
            gen = input_ids.tolist()
        out = base
        for r, g in enumerate(gen):
            bad = self.banned(r, g)
            if bad and len(bad) < scores.shape[-1]:
                if out is base:
                    out = base.clone()
                row = scores[r].float().clone()
                row[list(bad)] = float("-inf")
                out[r] = torch.log_softmax(row, dim=-1)
        return out

    def __repr__(self) -> str:
        return (f"Verify(threshold={self.threshold}, max_retries={self.max_retries}, "
                f"regenerate={self.regenerate!r})")
