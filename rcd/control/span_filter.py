"""Span filter: a hard mask for extractive answers (copy a span of the evidence, then stop).

Let a = tokens generated since the answer started (``input_ids[:, start:]``) and e ranges over
the row's evidence token sequences. The allowed next tokens are

* a empty:      every token that occurs in the evidence;
* a non-empty:  { e[j+1] : e[j-L+1..j] = a[-L:] } for the *longest* L ≥ 1 with any match,
                plus ``eos`` (when ``allow_eos``);
* nothing allowed (no match, end of the evidence, no evidence): ``eos``.

Every other token gets log-prob -inf; the allowed ones are renormalised. Decoding under this
filter therefore emits a contiguous substring of one evidence sequence followed by eos.
The index per row maps each token to its (sequence, position) occurrences; a step extends the
candidate matches of a's last token backwards, so its cost is the number of occurrences of
that token times the match length, independent of the evidence length.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from rcd.control.base import ControlError, LogitsControl, masked_rows


class _RowIndex:
    """Evidence of one row: sequences, token -> occurrences, and the set of all tokens."""

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        self.seqs: list[list[int]] = [list(map(int, s)) for s in sequences]
        self.occ: dict[int, list[tuple[int, int]]] = {}
        for s, seq in enumerate(self.seqs):
            for j, tok in enumerate(seq):
                self.occ.setdefault(tok, []).append((s, j))
        self.tokens: list[int] = sorted(self.occ)

    def continuations(self, answer: Sequence[int]) -> set[int]:
        """{e[j+1]} over the occurrences e[j-L+1..j] of the longest matching suffix of ``answer``."""
        cands = self.occ.get(answer[-1], [])
        if not cands:
            return set()
        length = 1
        while length < len(answer):
            want = answer[-length - 1]
            nxt = [(s, j) for s, j in cands if j - length >= 0 and self.seqs[s][j - length] == want]
            if not nxt:
                break
            cands, length = nxt, length + 1
        return {self.seqs[s][j + 1] for s, j in cands if j + 1 < len(self.seqs[s])}


class SpanFilter(LogitsControl):
    """log p'(v) = log p(v) - log Σ_{u∈A} p(u) for v ∈ A (allowed set, see module doc), -inf otherwise."""

    name = "span"
    accepts_units = ("chunks",)
    score_refusal = ("the span filter is a hard mask for extractive answers: the perplexity of text outside the "
                     "evidence is infinite. Use it on a QA task, or choose control=context|replug|tag_bias")

    def __init__(self, eos_token_id: Optional[int | Sequence[int]] = None, allow_eos: bool = True) -> None:
        """``eos_token_id``: the token(s) that end a span (the fallback when nothing may follow); None:
        the model's eos tokens, set by the engine at start-up (:meth:`prepare`)."""
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if eos_token_id is not None and not eos:
            raise ValueError("SpanFilter: eos_token_id is an empty list; give the eos token id(s), or null for the "
                             "model's")
        if any(int(e) < 0 for e in eos):
            raise ValueError(f"SpanFilter: eos_token_id {eos_token_id} is not a token id; null means the model's eos")
        self.eos: list[int] = [int(e) for e in eos]
        self.allow_eos = bool(allow_eos)
        self.rows: Optional[list[Optional[_RowIndex]]] = None
        self.start: Optional[int] = None

    def set_evidence(
        self, evidence: Sequence[Optional[Sequence[Sequence[int]]]], start: Optional[int] = None
    ) -> None:
        """Evidence token sequences per row (``[row][seq] -> ids``; a ``None`` row is unconstrained).

        ``start``: length of ``input_ids`` when the answer starts; ``None`` takes the length
        seen at the next :meth:`apply` (the prompt length when set before ``generate``).
        """
        self.rows = [None if ev is None else _RowIndex(ev) for ev in evidence]
        self.start = self._start_given = start

    def reset(self, start: Optional[int] = None) -> None:
        """Keep the evidence, start a new answer at ``start`` (``None``: next apply)."""
        self.start = start

    def reset_call(self) -> None:
        """A new ``model.generate`` call: the answer / continuation starts again where set_evidence said
        (``start=None``: at the new call's prompt length)."""
        self.start = getattr(self, "_start_given", None)

    # ------------------------------------------------------------------ engine protocol
    def prepare(self, lm, eos_ids) -> None:
        if not self.eos:  # eos_token_id=None: the model's eos tokens
            self.eos = sorted(int(e) for e in eos_ids)

    def take(self, run, rows: list[int], hits) -> None:
        """The retrieved passages' token ids are the evidence of each firing row; the answer starts
        at the row's first generated token."""
        super().take(run, rows, hits)
        self.set_evidence([[run.engine.encode(p.text) for p in ps] if run.has_evidence[b] else None
                           for b, ps in enumerate(run.passages)], start=0)

    # ------------------------------------------------------------------ inside vLLM (rcd.engine.vllm_engine)
    def vllm_evidence(self, run, row: int) -> Optional[dict]:
        """Right after row ``row`` fired: its evidence token sequences (the answer starts at its first token)."""
        if not bool(run.has_evidence[row]):
            return None
        return {"seqs": [run.engine.encode(p.text) for p in run.passages[row]], "start": 0}

    def vllm_args(self, engine, evidence: Optional[dict], generated: Sequence[int] = ()) -> Optional[dict]:
        """``extra_args`` of a segment for :class:`rcd.engine.vllm_plugin.SpanFilterMask` (this control's apply)."""
        if evidence is None:
            return None
        from rcd.engine.vllm_plugin import SPAN_ARGS

        return {SPAN_ARGS: {"seqs": evidence["seqs"], "eos": list(self.eos), "allow_eos": self.allow_eos,
                            "since": list(generated[evidence["start"]:])}}

    def score_window(self, scorer, win):
        raise ControlError(self.score_refusal)

    def allowed(self, row: int, answer: Sequence[int]) -> list[int]:
        """Sorted allowed next-token ids for evidence row ``row`` after ``answer`` (None row: [])."""
        if self.rows is None:
            raise ValueError("SpanFilter: no evidence; call set_evidence(evidence) first")
        index = self.rows[row if len(self.rows) > 1 else 0]
        if index is None:
            return []
        if len(answer) == 0:
            out = set(index.tokens)
        else:
            out = index.continuations(answer)
            if self.allow_eos:
                out.update(self.eos)
        if not out:
            out = set(self.eos)
        return sorted(out)

    def apply(
        self,
        scores: torch.Tensor,
        *,
        input_ids: Optional[torch.Tensor] = None,
        hidden: Optional[torch.Tensor] = None,
        fire: Optional[torch.Tensor] = None,
        **_: Any,
    ) -> torch.Tensor:
        base = torch.log_softmax(scores, dim=-1)
        if self.rows is None:
            raise ValueError("SpanFilter: no evidence; call set_evidence(evidence) first")
        if not self.eos:
            raise ValueError("SpanFilter: no eos token: pass eos_token_id= (outside rcd's engine, which sets the model's)")
        if input_ids is None:
            raise ValueError("SpanFilter needs input_ids (the answer generated so far) to know what may follow")
        n, vocab = scores.shape
        if len(self.rows) not in (1, n):
            raise ValueError(f"SpanFilter: evidence for {len(self.rows)} rows but scores have {n} rows")
        if self.start is None:
            self.start = input_ids.shape[1]
        answers = input_ids[:, self.start:].tolist()
        fire_list = None if fire is None else fire.tolist()
        mask = torch.zeros(n, vocab, dtype=torch.bool)
        for r in range(n):
            if fire_list is not None and not fire_list[r]:
                mask[r] = True  # left unchanged below (masked_rows takes base)
                continue
            if self.rows[r if len(self.rows) > 1 else 0] is None:
                mask[r] = True
                continue
            ids = self.allowed(r, answers[r])
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise ValueError(f"SpanFilter: token ids {bad[:5]} outside the vocabulary of size {vocab}")
            mask[r, ids] = True
        mask = mask.to(scores.device)
        new = torch.log_softmax(base.masked_fill(~mask, float("-inf")), dim=-1)
        dead = torch.isnan(new).any(dim=-1)  # every allowed token already had p = 0: emit eos
        if bool(dead.any()):
            eos_row = torch.full((vocab,), float("-inf"), dtype=new.dtype, device=new.device)
            eos_row[self.eos[0]] = 0.0
            new = torch.where(dead.view(-1, 1), eos_row, new)
        return masked_rows(new, base, fire)
