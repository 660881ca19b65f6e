"""Splitting corpus rows into chunks: the entries of the chunk, tag and latent datastores.

Three ways, chosen by ``chunking``:

* ``tokens`` — windows of ``chunk_size`` LM tokens (the LM's own tokenizer, so sizes are in the
  tokens the model will read) starting every ``chunk_size - overlap`` tokens: spans
  ``[0, S), [S-O, 2S-O), …`` until the window that reaches the end of the row; a row of n ≤ S
  tokens is one chunk. A chunk's text is the exact character span of its tokens in the row
  (from the tokenizer's offset mapping; decoded tokens for tokenizers without offsets), and its
  token ids are kept (the latent datastore runs the LM on exactly these ids).
* ``sentence`` — sentences (a split after ``.``, ``!`` or ``?`` followed by white space, and at
  every blank line) packed greedily into chunks of at most ``chunk_size`` words (white-space
  separated); consecutive chunks share the longest run of trailing whole sentences totalling at
  most ``overlap`` words that still leaves room for the next new sentence. A sentence longer than ``chunk_size`` words is cut at word boundaries
  into pieces of ``chunk_size`` words. No tokenizer is needed.
* ``record`` — one chunk per corpus row, the row's whole text (rows of white space only are
  skipped); ``chunk_size``/``overlap`` are ignored. An encoder reads at most its
  ``max_seq_length`` word pieces of it (256 for MiniLM).

Chunks never cross rows. Every chunk records its corpus row and its character span in that row.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

CHUNKINGS = ("tokens", "sentence", "record")

_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n[ \t]*\n\s*")
_WORD = re.compile(r"\S+")


@dataclass
class Chunk:
    """One entry: ``text`` = ``row_text[start:end]`` of corpus row ``row`` (start = end = -1 if unknown)."""

    row: int
    start: int
    end: int
    text: str
    token_ids: Optional[list[int]] = field(default=None, repr=False)


def token_windows(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Token spans [s, e) of size ``size`` every ``size - overlap`` tokens, the last one ending at n."""
    check_sizes("tokens", size, overlap)
    spans: list[tuple[int, int]] = []
    s, stride = 0, size - overlap
    while s < n:
        e = min(s + size, n)
        spans.append((s, e))
        if e == n:
            break
        s += stride
    return spans


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text`` (stripped of surrounding white space)."""
    spans, pos = [], 0
    for m in _SENT_END.finditer(text):
        spans.append((pos, m.start() + _closing_len(m.group(0))))
        pos = m.end()
    spans.append((pos, len(text)))
    out = []
    for s, e in spans:
        seg = text[s:e]
        ls = len(seg) - len(seg.lstrip())
        rs = len(seg.rstrip())
        if rs > ls:
            out.append((s + ls, s + rs))
    return out


def _closing_len(sep: str) -> int:
    """Length of the closing quotes/brackets at the start of a sentence separator."""
    n = 0
    while n < len(sep) and sep[n] in "\"')]":
        n += 1
    return n


def sentence_chunks(text: str, size: int, overlap: int) -> list[tuple[int, int]]:
    """Character spans of chunks of whole sentences, at most ``size`` words, ``overlap`` words shared."""
    check_sizes("sentence", size, overlap)
    units: list[tuple[int, int, int]] = []  # (start, end, words) with words <= size
    for s, e in sentence_spans(text):
        words = list(_WORD.finditer(text, s, e))
        for w0 in range(0, len(words), size):
            piece = words[w0:w0 + size]
            units.append((piece[0].start(), piece[-1].end(), len(piece)))
    spans: list[tuple[int, int]] = []
    a = 0
    while a < len(units):
        b, total = a, 0
        while b < len(units) and (b == a or total + units[b][2] <= size):
            total += units[b][2]
            b += 1
        spans.append((units[a][0], units[b - 1][1]))
        if b == len(units):
            break
        nxt, kept = b, 0
        # share trailing sentences, but leave room for sentence b so every chunk adds new text
        while nxt - 1 > a and kept + units[nxt - 1][2] <= overlap and kept + units[nxt - 1][2] + units[b][2] <= size:
            nxt -= 1
            kept += units[nxt][2]
        a = nxt
    return spans


def check_sizes(chunking: str, size: Any, overlap: Any) -> None:
    if chunking not in CHUNKINGS:
        raise ValueError(f"chunking={chunking!r}: choose one of {', '.join(CHUNKINGS)}")
    if chunking == "record":
        return
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"chunk_size={size!r} must be a positive integer ({'LM tokens' if chunking == 'tokens' else 'words'})")
    if not isinstance(overlap, int) or not 0 <= overlap < size:
        raise ValueError(f"overlap={overlap!r} must be an integer with 0 <= overlap < chunk_size={size}")


class Chunker:
    """Turns corpus rows into :class:`Chunk` s with one of the three methods (see module doc)."""

    def __init__(self, chunking: str = "tokens", chunk_size: int = 128, overlap: int = 32, tokenizer=None):
        check_sizes(chunking, chunk_size, overlap)
        if chunking == "tokens" and tokenizer is None:
            raise ValueError("chunking=tokens measures chunks in LM tokens and needs the LM's tokenizer; "
                             "pass a model or use chunking=sentence / chunking=record")
        self.chunking = chunking
        self.chunk_size = None if chunking == "record" else int(chunk_size)
        self.overlap = None if chunking == "record" else int(overlap)
        self.tokenizer = tokenizer

    def spec(self) -> dict[str, Any]:
        """What the chunks depend on (part of a datastore's fingerprint)."""
        from rcd.models import tokenizer_fingerprint

        tok = tokenizer_fingerprint(self.tokenizer) if self.chunking == "tokens" else None
        return {"chunking": self.chunking, "chunk_size": self.chunk_size, "overlap": self.overlap, "tokenizer": tok}

    def chunks(self, texts: Sequence[str], first_row: int = 0) -> list[Chunk]:
        """Chunks of ``texts``, whose rows are numbered from ``first_row``."""
        if self.chunking == "record":
            return [Chunk(first_row + i, 0, len(t), t) for i, t in enumerate(texts) if t and t.strip()]
        if self.chunking == "sentence":
            return [Chunk(first_row + i, s, e, t[s:e]) for i, t in enumerate(texts)
                    for s, e in sentence_chunks(t or "", self.chunk_size, self.overlap)]
        return self._token_chunks(texts, first_row)

    def _token_chunks(self, texts: Sequence[str], first_row: int) -> list[Chunk]:
        tok = self.tokenizer
        texts = [t or "" for t in texts]
        offsets = None
        if getattr(tok, "is_fast", False):
            enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
        else:
            enc = tok(texts, add_special_tokens=False)
        out: list[Chunk] = []
        for i, (text, ids) in enumerate(zip(texts, enc["input_ids"])):
            for s, e in token_windows(len(ids), self.chunk_size, self.overlap):
                piece = list(ids[s:e])
                if offsets is not None:
                    cs, ce = offsets[i][s][0], offsets[i][e - 1][1]
                    out.append(Chunk(first_row + i, cs, ce, text[cs:ce], piece))
                else:
                    out.append(Chunk(first_row + i, -1, -1, tok.decode(piece), piece))
        return out
