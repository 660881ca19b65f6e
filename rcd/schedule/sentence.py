"""``Sentence``: retrieve at the start and after every sentence boundary.

A token ends a sentence when its decoded text, stripped of trailing whitespace, ends with
one of the ``boundary`` characters, or (``newline=True``) contains a newline. The table of
such tokens is computed once per tokenizer in :meth:`Sentence.bind`. ``min_tokens`` skips a
boundary that comes fewer than that many tokens after the row's last firing (verse lines end in
newlines every ~8 tokens: ``min_tokens=24`` fires about once per three lines).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from rcd.schedule.base import Schedule


def decode_vocab(tokenizer: Any) -> list[str]:
    """Text of every single token id ``0 .. len(tokenizer)-1`` of an HF-like tokenizer.

    Uses ``batch_decode`` when available, else ``decode([i])``, else ``convert_ids_to_tokens``.
    """
    try:
        n = len(tokenizer)
    except TypeError as e:
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no len(); cannot enumerate its vocabulary") from e
    ids = list(range(n))
    if hasattr(tokenizer, "batch_decode"):
        texts = tokenizer.batch_decode([[i] for i in ids])
    elif hasattr(tokenizer, "decode"):
        texts = [tokenizer.decode([i]) for i in ids]
    elif hasattr(tokenizer, "convert_ids_to_tokens"):
        texts = tokenizer.convert_ids_to_tokens(ids)
    else:
        raise TypeError(
            f"tokenizer {type(tokenizer).__name__} has neither batch_decode, decode nor convert_ids_to_tokens"
        )
    return [t if isinstance(t, str) else "" for t in texts]


class Sentence(Schedule):
    """fire_0 = 1; fire_t = end(x_{t-1}) with end(v) = rstrip(text(v))[-1:] ∈ boundary ∨ (newline ∧ "\\n" ∈ text(v))."""

    name = "sentence"
    needs_tokenizer = True

    def __init__(self, boundary: str | Sequence[str] = ".!?", newline: bool = True, min_tokens: int = 0) -> None:
        super().__init__()
        if isinstance(min_tokens, bool) or int(min_tokens) != min_tokens or int(min_tokens) < 0:
            raise ValueError(f"Sentence: min_tokens must be an integer >= 0, got {min_tokens!r}")
        #: a boundary fires only when at least this many tokens came since the row last fired (0: every boundary)
        self.min_tokens = int(min_tokens)
        self._last_fire: Optional[torch.Tensor] = None  # [B] step of each row's last firing (per batch)
        chars = tuple(boundary)
        if not chars and not newline:
            raise ValueError("Sentence: boundary is empty and newline=False, so no token could ever end a sentence")
        if any(len(c) != 1 for c in chars):
            raise ValueError(f"Sentence: boundary must be single characters, got {boundary!r}")
        self.boundary = "".join(chars)
        self.newline = bool(newline)
        self.ends_sentence: Optional[torch.Tensor] = None  # bool [V_tok], on CPU
        self._table_on: dict[torch.device, torch.Tensor] = {}

    def params(self) -> dict[str, Any]:
        return {"boundary": self.boundary, "newline": self.newline, "min_tokens": self.min_tokens}

    def reset(self, batch_size: int, device=None) -> None:
        super().reset(batch_size, device)
        self._last_fire = None

    def is_boundary(self, text: str) -> bool:
        """Whether one token's decoded ``text`` ends a sentence."""
        stripped = text.rstrip()
        if stripped and stripped[-1] in self.boundary:
            return True
        return self.newline and "\n" in text

    def bind(self, tokenizer: Any) -> "Sentence":
        self.ends_sentence = torch.tensor([self.is_boundary(t) for t in decode_vocab(tokenizer)], dtype=torch.bool)
        self.bound_tokenizer = tokenizer
        self._table_on = {}
        if not bool(self.ends_sentence.any()):
            raise ValueError(
                f"Sentence: no token of {type(tokenizer).__name__} ends a sentence with boundary={self.boundary!r} "
                f"newline={self.newline}; this schedule would fire only once"
            )
        return self

    def _table(self, device: torch.device) -> torch.Tensor:
        if self.ends_sentence is None:
            raise RuntimeError("Sentence schedule is unbound: call bind(tokenizer) before should_fire / fire_mask")
        if device not in self._table_on:
            self._table_on[device] = self.ends_sentence.to(device)
        return self._table_on[device]

    def ends(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bool of ``tokens``' shape: token ends a sentence (ids outside the tokenizer's vocab: False)."""
        table = self._table(tokens.device)
        inside = (tokens >= 0) & (tokens < table.numel())
        return table[tokens.clamp(0, table.numel() - 1)] & inside

    def _decide(self, step: int, probs: Optional[torch.Tensor], last_tokens: Optional[torch.Tensor],
                batch: int, device: torch.device) -> torch.Tensor:
        self._table(device)  # unbound use fails at any step, not only after step 0
        if step == 0:
            self._last_fire = torch.zeros(batch, dtype=torch.long)
            return self._full(batch, True, device)
        if last_tokens is None:
            raise ValueError(f"Sentence.should_fire: last_tokens is required at step {step} > 0")
        fire = self.ends(last_tokens)
        if self.min_tokens:
            if self._last_fire is None or self._last_fire.numel() != batch:
                self._last_fire = torch.zeros(batch, dtype=torch.long)  # a caller that began after step 0
            fire = fire & ((step - self._last_fire) >= self.min_tokens).to(fire.device)
            self._last_fire[fire.cpu()] = step
        return fire

    def _decide_all(self, probs: Optional[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        mask = self.ends(tokens)
        mask[:, 0] = True
        if self.min_tokens:  # sequential: whether t fires depends on the last firing before it
            last = torch.zeros(mask.shape[0], dtype=torch.long)
            for t in range(1, mask.shape[1]):
                ok = mask[:, t].cpu() & ((t - last) >= self.min_tokens)
                last[ok] = t
                mask[:, t] = ok.to(mask.device)
        return mask
