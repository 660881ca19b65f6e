"""Retrieval queries and the evidence they return, for generation and for scoring.

A query is text built from the request and the tokens generated so far (``strategy.retrieval.query``):

==================  ========================================================================
``auto``            the prompt (or the request's ``query``) at step 0, then prompt + the last
                    ``query_tokens`` generated tokens
``prompt``          the prompt only
``last_sentence``   the last finished sentence of the generation (the prompt before one exists)
``last_tokens``     the last ``query_tokens`` tokens of prompt + generation
``prompt+generated`` prompt + the last ``query_tokens`` generated tokens
==================  ========================================================================

Hits come back as chunk hits (``ids``, ``scores``, ``texts``, ``doc_ids`` per row) or tag hits
(``tags``, ``weights``); :func:`passages_from_hits` and :func:`tag_evidence` turn one row into
what a control consumes.
"""
from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

QUERY_MODES = ("auto", "prompt", "last_sentence", "last_tokens", "prompt+generated")


def last_sentence(text: str) -> str:
    parts = [p for p in re.split(r"(?<=[.!?\n])\s+", text.strip()) if p.strip()]
    return parts[-1] if parts else ""


def build_query(mode: str, base: str, prompt_ids: Callable[[], list[int]], gen: Sequence[int], step: int,
                decode: Callable[[Sequence[int]], str], query_tokens: int,
                sentence: Optional[Sequence[int]] = None) -> str:
    """The query text of one row (see the module table). ``base``: the request's query or prompt;
    ``prompt_ids()``: the prompt's token ids (only ``last_tokens`` asks)."""
    if mode == "auto":
        mode = "prompt" if step == 0 and sentence is None else "prompt+generated"
    if mode == "prompt":
        return base
    tail = decode(list(sentence) if sentence is not None else list(gen)[-query_tokens:])
    if mode == "prompt+generated":
        return f"{base} {tail}".strip()
    if mode == "last_sentence":
        s = last_sentence(decode(sentence if sentence is not None else gen))
        return s or base
    ids = prompt_ids() + list(gen)
    return decode(ids[-query_tokens:])


def tag_evidence(hits, row: int, tokenizer, encode: Callable[[str], list[int]], tag_format: str
                 ) -> tuple[list[list[int]], list[float]]:
    """(token ids, weight) of the retrieved tags of one row.

    A hits object with ``bias_evidence(tokenizer)`` (rcd.datastore.tags.TagHits: both the plain
    and the space-prefixed spelling of each tag) decides; otherwise each tag is written as
    ``tag_format`` and tokenized.
    """
    if hasattr(hits, "bias_evidence"):
        if getattr(hits, "_rcd_bias", None) is None:
            hits._rcd_bias = hits.bias_evidence(tokenizer)
        ids, weights = hits._rcd_bias
        return [list(t) for t in ids[row]], [float(w) for w in weights[row]]
    return ([encode(tag_format.format(tag=t)) for t in hits.tags[row]], [float(w) for w in hits.weights[row]])


def hit_labels(hits, row: int) -> list[str]:
    """What one row retrieved, as labels: tags, or the document ids of real hits."""
    if hasattr(hits, "tags"):
        return list(hits.tags[row])
    return [str(d) for d, i in zip(hits.doc_ids[row], hits.ids[row].tolist()) if i >= 0]

