"""REPLUG ensemble (Shi et al. 2023, "REPLUG: Retrieval-Augmented Black-Box Language Models").

REPLUG runs one forward pass per retrieved document d (document prepended to the context),
giving next-token distributions p_d, and mixes their *probabilities* with weights from the
retrieval scores s_d:

    p'(v) = Σ_d λ_d · p_d(v),   λ = softmax(s / τ)

computed in log space as log p' = logsumexp_d(log λ_d + log p_d) (numerically stable).

In the engine REPLUG reads one *view* per retrieved document (document d + prompt + tokens so
far, ``views(k) = k``); every step runs all views and mixes them. Scoring a text mixes the target
probabilities of each document's view the same way.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from rcd.control.base import LogitsControl, masked_rows

DocLogprobsFn = Callable[[torch.Tensor], torch.Tensor]


def replug_mix(doc_logprobs: torch.Tensor, doc_scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log Σ_d softmax(doc_scores/τ)_d · exp(doc_logprobs_d): ``[N,D,V], [N,D] -> [N,V]``.

    ``doc_logprobs`` must be normalised log-probabilities. Padding documents may carry score
    ``-inf`` (weight 0) as long as each row has at least one finite score.
    """
    if doc_logprobs.dim() != 3:
        raise ValueError(f"replug_mix: doc_logprobs must be [N, D, V], got {tuple(doc_logprobs.shape)}")
    if doc_scores.shape != doc_logprobs.shape[:2]:
        raise ValueError(
            f"replug_mix: doc_scores must be [N, D] = {tuple(doc_logprobs.shape[:2])}, got {tuple(doc_scores.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"replug_mix: temperature must be > 0, got {temperature}")
    log_w = torch.log_softmax(doc_scores.to(doc_logprobs.dtype) / temperature, dim=-1)  # [N, D]
    return torch.logsumexp(log_w.unsqueeze(-1) + doc_logprobs, dim=1)


class ReplugEnsemble(LogitsControl):
    """p' = Σ_d softmax(s/τ)_d · p_d on firing rows; p' = softmax(scores) elsewhere.

    Per-document distributions come, in order of precedence, from the ``doc_logprobs`` /
    ``doc_scores`` keyword arguments of :meth:`apply`, from :meth:`set_evidence` (fixed
    tensors), or, inside ``model.generate``, from ``doc_logprobs_fn(input_ids) -> [N, D, V]``
    (one forward pass per document at the current step) with the scores from
    :meth:`set_evidence`. ``doc_logprobs`` may be logits; they are log-softmax-normalised.
    """

    name = "replug"
    accepts_units = ("chunks",)
    rebuilds_prompt = True

    def __init__(self, temperature: float = 1.0, doc_logprobs_fn: Optional[DocLogprobsFn] = None) -> None:
        if not temperature > 0:
            raise ValueError(f"ReplugEnsemble: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.doc_logprobs_fn = doc_logprobs_fn
        self.doc_logprobs: Optional[torch.Tensor] = None
        self.doc_scores: Optional[torch.Tensor] = None

    def set_evidence(
        self,
        doc_scores: torch.Tensor,
        doc_logprobs: Optional[torch.Tensor] = None,
        doc_logprobs_fn: Optional[DocLogprobsFn] = None,
    ) -> None:
        """Store retrieval scores ``[N, D]`` and either fixed ``doc_logprobs [N, D, V]`` or a provider."""
        self.doc_scores = doc_scores
        self.doc_logprobs = doc_logprobs
        if doc_logprobs_fn is not None:
            self.doc_logprobs_fn = doc_logprobs_fn

    def reset(self) -> None:
        """Forget stored evidence."""
        self.doc_scores = None
        self.doc_logprobs = None

    def apply(
        self,
        scores: torch.Tensor,
        *,
        input_ids: Optional[torch.Tensor] = None,
        hidden: Optional[torch.Tensor] = None,
        fire: Optional[torch.Tensor] = None,
        doc_logprobs: Optional[torch.Tensor] = None,
        doc_scores: Optional[torch.Tensor] = None,
        **_: Any,
    ) -> torch.Tensor:
        base = torch.log_softmax(scores, dim=-1)
        if fire is not None and not bool(fire.any()):
            return base
        if doc_scores is None:
            doc_scores = self.doc_scores
        if doc_logprobs is None:
            doc_logprobs = self.doc_logprobs
        if doc_logprobs is None and self.doc_logprobs_fn is not None:
            if input_ids is None:
                raise ValueError("ReplugEnsemble: doc_logprobs_fn needs input_ids")
            doc_logprobs = self.doc_logprobs_fn(input_ids)
        if doc_logprobs is None or doc_scores is None:
            raise ValueError(
                "ReplugEnsemble: no documents; pass doc_logprobs and doc_scores, or call set_evidence() first"
            )
        if doc_logprobs.shape[0] != scores.shape[0] or doc_logprobs.shape[-1] != scores.shape[-1]:
            raise ValueError(
                f"ReplugEnsemble: doc_logprobs {tuple(doc_logprobs.shape)} do not match scores {tuple(scores.shape)} "
                "(need [N, D, V])"
            )
        doc_lp = F.log_softmax(doc_logprobs.to(device=base.device, dtype=base.dtype), dim=-1)
        mixed = replug_mix(doc_lp, doc_scores.to(base.device), self.temperature)
        return masked_rows(mixed, base, fire)

    # ------------------------------------------------------------------ engine protocol
    def views(self, k: int) -> int:
        return int(k)

    def prompt_passages(self, run, row: int) -> list[list]:
        ps = run.passages[row]
        return [[ps[v]] if v < len(ps) else [] for v in range(run.n_views)]

    @staticmethod
    def view_scores(run) -> torch.Tensor:
        """[B, V] retrieval score of the passage each view reads (-inf for views without one)."""
        s = torch.zeros(run.B, run.n_views)
        for b in range(run.B):
            ps = run.passages[b]
            if ps:
                s[b] = float("-inf")
                for v in range(min(run.n_views, len(ps))):
                    s[b, v] = ps[v].score
        return s

    def logprobs(self, run, logits: torch.Tensor, fire: torch.Tensor) -> torch.Tensor:
        doc = logits.view(run.B, run.n_views, -1)
        return self.apply(doc[:, 0], doc_logprobs=doc, doc_scores=self.view_scores(run).to(doc.device))

    def score_window(self, scorer, win):
        return None  # the views are scored after the plain pass (score_after)

    def score_after(self, scorer) -> torch.Tensor:
        """Each position after a firing position: Σ_d softmax(s/τ)_d · p(x | document d + text)."""
        e = scorer.engine
        segs = scorer.segments()
        views, owner = [], []
        for si, (a, b, ps) in enumerate(segs):
            for p in ps[: e.k]:
                views.append({"a": a, "b": b, "prefix": e.encode(scorer.template.block([p]))[: scorer.window // 2]})
                owner.append(si)
        lps = scorer.view_logprobs(views)
        nll = scorer.nll_none.clone()
        for si, (a, b, ps) in enumerate(segs):
            doc_lp = torch.stack([lp for lp, o in zip(lps, owner) if o == si], 1).unsqueeze(-1)  # [b-a, D, 1]
            sc = torch.tensor([[q.score for q in ps[: e.k]]] * (b - a), dtype=torch.float64)
            nll[a:b] = -replug_mix(doc_lp, sc, self.temperature).squeeze(-1)
        return nll
