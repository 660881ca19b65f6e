"""Context-Aware Decoding (Shi et al. 2023, "Trusting Your Evidence: Hallucinate Less with Context-aware
Decoding").

Each row is read twice, with the retrieved passages in its prompt (view 0, as ``context`` renders it) and
without them (view 1, the plain prompt), and the next-token distribution contrasts the two:

    log p'(v) = log_softmax((1 + α) · z_ctx(v) − α · z_plain(v))

with z the logits of each view. α = 0 is the ``context`` control exactly (the plain view then has weight 0
and is not computed); α > 0 down-weights what the model would say without the evidence. Rows that hold no
evidence yet read the same prompt in both views, so p' = p there. Scoring a text contrasts, at each
position after a firing position, the text after the passages with the same text alone
(:meth:`rcd.engine.scoring.Scorer.combined_logprobs`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from rcd.control.context import ContextControl, Passage


def cad_logprobs(with_ctx: torch.Tensor, without: torch.Tensor, alpha: float) -> torch.Tensor:
    """log_softmax((1 + α) · with_ctx − α · without) over the last dim (α = 0: log_softmax(with_ctx))."""
    if alpha == 0:
        return torch.log_softmax(with_ctx.float(), -1)
    return torch.log_softmax((1.0 + alpha) * with_ctx.float() - alpha * without.float(), -1)


class ContextAwareDecoding(ContextControl):
    """how = logits over two views: p' ∝ p_ctx^(1+α) / p_plain^α (module doc)."""

    name = "cad"
    how = "logits"

    def __init__(self, alpha: float = 0.5, template: Optional[dict] = None, max_passages: Optional[int] = None) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"ContextAwareDecoding: alpha must be a finite number >= 0, got {alpha!r}")
        super().__init__(template=template, max_passages=max_passages)
        self.alpha = float(alpha)

    def views(self, k: int) -> int:
        return 1 if self.alpha == 0 else 2

    def prompt_passages(self, run, row: int) -> list[Sequence[Passage]]:
        with_ctx = self.select(run.passages[row])
        return [with_ctx] if self.alpha == 0 else [with_ctx, []]

    def logprobs(self, run, logits: torch.Tensor, fire: torch.Tensor) -> torch.Tensor:
        if self.alpha == 0:
            return torch.log_softmax(logits, -1)
        two = logits.view(run.B, 2, -1)
        return cad_logprobs(two[:, 0], two[:, 1], self.alpha)

    def score_after(self, scorer) -> torch.Tensor:
        if self.alpha == 0:
            return super().score_after(scorer)
        e = scorer.engine
        groups = [{"a": a, "b": b, "views": [
            {"prefix": e.encode(scorer.template.block(self.select(ps)))[: scorer.window // 2]}, {"prefix": []}]}
            for a, b, ps in self.segments(scorer)]
        nll = scorer.nll_none.clone()
        for g, lp in zip(groups, scorer.combined_logprobs(groups, lambda z: cad_logprobs(z[0], z[1], self.alpha))):
            nll[g["a"]:g["b"]] = -lp
        return nll

    def __repr__(self) -> str:
        return f"ContextAwareDecoding(alpha={self.alpha}, template={self.template_overrides}, " \
               f"max_passages={self.max_passages})"
