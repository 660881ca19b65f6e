"""Tag bias: lexical steering of decoding toward retrieved labels (tags).

Each retrieved tag is a token-id sequence with a weight (e.g. its retrieval score). The bias of
token v is the summed weight of the tags that *start* with v:

    b_v = Σ_{tags k : tag_k[0] = v} w_k,        p'(v) ∝ p(v) · exp(β · b_v)

With ``continuation=True`` a tag already begun in the generated text also pulls its next
token: when the last j tokens generated since the evidence was set equal tag_k[:j]
(1 ≤ j < len(tag_k), longest such j per tag), w_k is added to the bias of tag_k[j].

In the engine the tags retrieved when the schedule fires become the row's evidence
(:meth:`TagBias.take`) and bias every later step of that row; scoring a text biases the plain
logits of the positions after each firing position (no continuation: nothing was generated).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from rcd.control.base import LogitsControl, masked_rows


class TagBias(LogitsControl):
    """p'(v) ∝ p(v) · exp(β · (b_v + c_v)): b from tags' first tokens, c from begun tags (optional)."""

    name = "tags"
    accepts_units = ("tags",)

    def __init__(self, beta: float = 1.0, vocab_size: Optional[int] = None, continuation: bool = False) -> None:
        self.beta = float(beta)
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        self.continuation = bool(continuation)
        self.tags: Optional[list[list[tuple[list[int], float]]]] = None
        self.bias: Optional[torch.Tensor] = None  # dense [N, V], built once per set_evidence
        self.start: Optional[int] = None

    def set_evidence(
        self,
        tag_token_ids: Sequence[Sequence[Sequence[int]]],
        weights: Sequence[Sequence[float]],
        start: Optional[int] = None,
    ) -> None:
        """Tags per row (``[row][tag] -> token ids``) and their weights (``[row][tag]``).

        ``start``: length of ``input_ids`` when the evidence arrives (tokens before it are not
        matched for continuation); ``None`` takes the length seen at the next :meth:`apply`.
        """
        if len(tag_token_ids) != len(weights):
            raise ValueError(f"TagBias: {len(tag_token_ids)} rows of tags but {len(weights)} rows of weights")
        tags: list[list[tuple[list[int], float]]] = []
        for r, (row_tags, row_w) in enumerate(zip(tag_token_ids, weights)):
            if len(row_tags) != len(row_w):
                raise ValueError(f"TagBias: row {r} has {len(row_tags)} tags but {len(row_w)} weights")
            tags.append([(list(map(int, t)), float(w)) for t, w in zip(row_tags, row_w) if len(t) > 0])
        self.tags = tags
        self.start = self._start_given = start
        self.bias = None
        if self.vocab_size is not None:
            self.bias = self._build(self.vocab_size, torch.device("cpu"))

    def reset(self, start: Optional[int] = None) -> None:
        """Keep the tags, restart continuation matching at ``start`` (``None``: next apply)."""
        self.start = start

    def reset_call(self) -> None:
        """A new ``model.generate`` call: the answer / continuation starts again where set_evidence said
        (``start=None``: at the new call's prompt length)."""
        self.start = getattr(self, "_start_given", None)

    # ------------------------------------------------------------------ engine protocol
    def begin(self, run) -> None:
        self._rows: list[list[tuple[list[int], float]]] = [[] for _ in range(run.B)]

    def take(self, run, rows: list[int], hits) -> None:
        """The retrieved tags (token ids, weight) of each firing row become its evidence."""
        for j, b in enumerate(rows):
            self._rows[b] = list(zip(*run.engine.tag_evidence(hits, j)))
            run.has_evidence[b] = True
        self.set_evidence([[t for t, _ in row] for row in self._rows], [[w for _, w in row] for row in self._rows],
                          start=run.step_no)

    # ------------------------------------------------------------------ inside vLLM (rcd.engine.vllm_engine)
    def vllm_evidence(self, run, row: int) -> dict:
        """Right after row ``row`` fired: its tags, weights and the step they arrived at (kept by the engine)."""
        tags = self._rows[row]
        return {"tags": [list(t) for t, _ in tags], "weights": [float(w) for _, w in tags], "start": int(run.step_no)}

    def vllm_args(self, engine, evidence: Optional[dict], generated: Sequence[int] = ()) -> Optional[dict]:
        """``extra_args`` of a segment for :class:`rcd.engine.vllm_plugin.TagBiasMixture`: this control's
        apply on the row's evidence, with the tokens generated since it arrived (continuation)."""
        if evidence is None or not evidence["tags"]:
            return None
        from rcd.engine.vllm_plugin import TAG_ARGS

        return {TAG_ARGS: {"tags": evidence["tags"], "weights": evidence["weights"], "beta": self.beta,
                           "continuation": self.continuation, "since": list(generated[evidence["start"]:])}}

    def _build(self, vocab: int, device: torch.device) -> torch.Tensor:
        assert self.tags is not None
        bias = torch.zeros(len(self.tags), vocab, dtype=torch.float32)
        for r, row in enumerate(self.tags):
            for tag, w in row:
                if not 0 <= tag[0] < vocab:
                    raise ValueError(f"TagBias: tag token id {tag[0]} outside the vocabulary of size {vocab}")
                bias[r, tag[0]] += w
        return bias.to(device)

    def _continuation(self, input_ids: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
        assert self.tags is not None and self.start is not None
        extra = torch.zeros(n, vocab, dtype=torch.float32)
        longest = max((len(t) for row in self.tags for t, _ in row), default=0)
        if longest < 2:
            return extra
        avail = max(input_ids.shape[1] - self.start, 0)
        window = min(avail, longest - 1)
        if window == 0:
            return extra
        tails = input_ids[:, input_ids.shape[1] - window:].tolist()
        for r in range(n):
            row = self.tags[r if len(self.tags) > 1 else 0]
            tail = tails[r]
            for tag, w in row:
                for j in range(min(len(tag) - 1, window), 0, -1):
                    if tail[window - j:] == tag[:j]:
                        if not 0 <= tag[j] < vocab:
                            raise ValueError(f"TagBias: tag token id {tag[j]} outside the vocabulary of size {vocab}")
                        extra[r, tag[j]] += w
                        break
        return extra

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
        if self.tags is None:
            raise ValueError("TagBias: no tags; call set_evidence(tag_token_ids, weights) first")
        n, vocab = scores.shape
        if len(self.tags) not in (1, n):
            raise ValueError(f"TagBias: evidence for {len(self.tags)} rows but scores have {n} rows")
        if input_ids is not None and self.start is None:
            self.start = input_ids.shape[1]
        if self.bias is None or self.bias.shape[1] != vocab or self.bias.device != scores.device:
            self.bias = self._build(vocab, scores.device)
        bias = self.bias.expand(n, vocab)
        if self.continuation and input_ids is not None:
            bias = bias + self._continuation(input_ids, n, vocab).to(scores.device)
        new = torch.log_softmax(base + self.beta * bias.to(base.dtype), dim=-1)
        return masked_rows(new, base, fire)
