"""The "how = context" axis: retrieved passages enter the prompt through a template.

A :class:`PromptTemplate` turns (prompt, passages) into the text the model reads up to the
point where generation starts:

* plain models / raw-text tasks (``chat="never"``)::

      preamble + header + passage_1 + joiner + ... + passage_k + footer + prompt

* chat models (``chat="auto"`` when the tokenizer has a chat template, or ``"always"``): the
  same block + prompt is the *user* message, optionally after a ``system`` message, and the
  tokenizer's chat template adds the assistant header (``add_generation_prompt=True``).

Without passages the block is empty and the result is the plain prompt (chat or not), so the
baseline and the retrieval run read the same instruction. Each passage is formatted with
``passage.format(text=..., doc_id=..., rank=..., score=...)``; ``max_passage_chars`` cuts long
passages (at a word boundary) before formatting.

:class:`ContextControl` is the control object of ``strategy/control=context``: when the schedule
fires it keeps the retrieved passages (``rebuilds_prompt``), and the engine (:mod:`rcd.engine`),
which owns the KV cache, renders the new prompt with them and re-prefills it together with the
tokens generated so far (In-Context RALM / FLARE). Scoring a text puts the passages retrieved at
each firing position before the text that follows it. Its template fields override the task's
template (``task.template``), field by field.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Sequence

import torch

from rcd.control.base import Control

CHAT_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class Passage:
    """One retrieved unit as the prompt sees it."""

    text: str
    doc_id: str = ""
    score: float = 0.0
    rank: int = 1
    id: int = -1  # datastore entry id (-1: not from a datastore)


def passages_from_hits(hits, row: int) -> list[Passage]:
    """Chunk hits row -> passages (entries with id < 0 are "no hit" and dropped)."""
    ids = hits.ids[row].tolist()
    scores = hits.scores[row].tolist()
    out = []
    for j, i in enumerate(ids):
        if i < 0:
            continue
        out.append(Passage(text=hits.texts[row][j], doc_id=str(hits.doc_ids[row][j]), score=float(scores[j]),
                           rank=len(out) + 1, id=int(i)))
    return out


def merge_passages(old: list[Passage], new: list[Passage]) -> list[Passage]:
    """``old`` then the passages of ``new`` not already there (same document id, or same text)."""
    seen = {p.doc_id or p.text for p in old}
    out = list(old)
    for p in new:
        key = p.doc_id or p.text
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


@dataclass(frozen=True)
class PromptTemplate:
    """prompt text = [chat wrapper of] preamble + header + join(passages) + footer + prompt (see module doc).
    ``preamble``: text before the passages whether there are passages or not (QA's solved examples for a base
    model, so the passages stand next to the question they were retrieved for)."""

    chat: str = "never"
    system: Optional[str] = None
    preamble: str = ""
    header: str = ""
    passage: str = "{text}"
    joiner: str = "\n"
    footer: str = "\n\n"
    max_passage_chars: Optional[int] = None

    def __post_init__(self) -> None:
        if self.chat not in CHAT_MODES:
            raise ValueError(f"PromptTemplate: chat must be one of {CHAT_MODES}, got {self.chat!r}")
        try:
            self.passage.format(text="", doc_id="", rank=1, score=0.0)
        except (KeyError, IndexError) as e:
            raise ValueError(
                f"PromptTemplate: passage format {self.passage!r} uses an unknown field {e}; "
                "the fields are {text}, {doc_id}, {rank}, {score}") from None
        if self.max_passage_chars is not None and int(self.max_passage_chars) < 1:
            raise ValueError(f"PromptTemplate: max_passage_chars must be >= 1 or null, got {self.max_passage_chars}")

    @classmethod
    def from_config(cls, cfg: Optional[dict] = None, **overrides: Any) -> "PromptTemplate":
        """Build from a plain dict (unknown keys are refused, naming the known ones)."""
        merged = dict(cfg or {})
        merged.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        bad = sorted(set(merged) - known)
        if bad:
            raise ValueError(f"PromptTemplate: unknown field(s) {bad}; known fields: {sorted(known)}")
        return cls(**merged)

    def updated(self, overrides: Optional[dict]) -> "PromptTemplate":
        """A copy with the non-null fields of ``overrides`` replaced."""
        if not overrides:
            return self
        known = {f.name for f in fields(self)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"PromptTemplate: unknown field(s) {bad}; known fields: {sorted(known)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    # ------------------------------------------------------------------ rendering
    def uses_chat(self, tokenizer: Any) -> bool:
        if self.chat == "never":
            return False
        has = getattr(tokenizer, "chat_template", None) is not None
        if self.chat == "always" and not has:
            raise ValueError(
                f"PromptTemplate(chat='always'): tokenizer {type(tokenizer).__name__} has no chat template; "
                "use chat=auto or chat=never")
        return has

    def _cut(self, text: str) -> str:
        n = self.max_passage_chars
        if n is None or len(text) <= n:
            return text
        cut = text[: int(n)]
        space = cut.rfind(" ")
        return (cut[:space] if space > n // 2 else cut).rstrip()

    def block(self, passages: Sequence[Passage]) -> str:
        """header + passages + footer, or "" without passages."""
        if not passages:
            return ""
        body = self.joiner.join(
            self.passage.format(text=self._cut(p.text), doc_id=p.doc_id, rank=p.rank, score=p.score) for p in passages)
        return f"{self.header}{body}{self.footer}"

    def render(self, tokenizer: Any, prompt: str, passages: Sequence[Passage] = ()) -> str:
        """The text read before the first generated token."""
        user = self.preamble + self.block(passages) + prompt
        if not self.uses_chat(tokenizer):
            return user
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + \
            [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


    def unwrap(self, tokenizer: Any, text: str) -> Optional[str]:
        """The user message of ``text`` if ``text`` is this template's chat rendering of one (the model's
        chat template around it, this template's system message), else None. :meth:`render` of the result with
        passages puts them inside the user turn, where the engine puts them."""
        if not self.uses_chat(tokenizer):
            return None
        mark = "\u2063rcd-user-message\u2063"
        wrapped = replace(self, header="", footer="").render(tokenizer, mark)
        if wrapped.count(mark) != 1:
            return None
        head, tail = wrapped.split(mark)
        if text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail):
            return text[len(head):len(text) - len(tail)]
        return None


class ContextControl(Control):
    """how = context: the prompt becomes template(passages, prompt) + tokens generated so far.

    ``template``: fields of :class:`PromptTemplate` that override the task's template (e.g.
    ``{"header": "Context:\\n"}``); ``max_passages``: use at most this many of the retrieved
    passages (None: all ``k``). Re-prefill and the KV cache belong to :class:`rcd.engine.Engine`.
    """

    name = "context"
    how = "context"
    accepts_units: tuple[str, ...] = ("chunks", "latent")
    rebuilds_prompt = True

    def __init__(self, template: Optional[dict] = None, max_passages: Optional[int] = None) -> None:
        if max_passages is not None and int(max_passages) < 1:
            raise ValueError(f"ContextControl: max_passages must be >= 1 or null, got {max_passages}")
        self.template_overrides = dict(template or {})
        PromptTemplate().updated(self.template_overrides)  # fail at start-up on unknown fields
        self.max_passages = None if max_passages is None else int(max_passages)
        self.datastore = None

    def template(self, base: PromptTemplate) -> PromptTemplate:
        return base.updated(self.template_overrides)

    def select(self, passages: Sequence[Passage]) -> list[Passage]:
        return list(passages if self.max_passages is None else passages[: self.max_passages])

    def prompt_passages(self, run, row: int) -> list[Sequence[Passage]]:
        return [self.select(run.passages[row])]

    def segments(self, scorer) -> list:
        """(a, b, passages) per firing position a (:meth:`rcd.engine.scoring.Scorer.segments`)."""
        return scorer.segments()

    def score_after(self, scorer) -> torch.Tensor:
        """Each position after a firing position reads the passages retrieved there, then the text
        (the passages take at most half the window)."""
        e = scorer.engine
        segs = self.segments(scorer)
        views = [{"a": a, "b": b, "prefix": e.encode(scorer.template.block(self.select(ps)))[: scorer.window // 2]}
                 for a, b, ps in segs]
        nll = scorer.nll_none.clone()
        for v, lp in zip(views, scorer.view_logprobs(views)):
            nll[v["a"]:v["b"]] = -lp
        return nll

    def __repr__(self) -> str:
        return f"ContextControl(template={self.template_overrides}, max_passages={self.max_passages})"
