"""Task ``task=lm_knn_grid`` (Figure 1): kNN-LM perplexity at every (k, λ) of a grid from one run.

The lm task's held-out perplexity with the strategy's kNN-LM control, plus the perplexity at every
(k, λ) in ``task.grid_ks`` × ``task.grid_lmbdas``, from the same forward pass and one search of
max(k) neighbours per scored token: p_kNN(target) is :func:`rcd.control.knn.knn_target_probs` of
the first k of them (the control's own arithmetic), mixed as (1-λ)·p_LM + λ·p_kNN. No generation.
``metrics.knn_grid.points``: k, lmbda, perplexity, ci_low, ci_high (bootstrap over tokens).
"""
from __future__ import annotations

import numpy as np

from rcd.tasks.lm import validate_with_model  # noqa: F401  (the lm task's model checks apply unchanged)


def validate(cfg) -> None:
    """Start-up checks: the lm task's, and the grid's."""
    from rcd.tasks import lm as lm_task
    from rcd.validate import ConfigError

    lm_task.validate(cfg)
    t = cfg.task
    ks, lmbdas = list(t.get("grid_ks") or []), list(t.get("grid_lmbdas") or [])
    if not ks or not all(isinstance(k, int) and k >= 1 for k in ks):
        raise ConfigError("task.grid_ks", f"must be a non-empty list of integers >= 1, got {ks}")
    if not lmbdas or not all(isinstance(x, (int, float)) and 0.0 <= x < 1.0 for x in lmbdas):
        raise ConfigError("task.grid_lmbdas", f"must be a non-empty list of numbers in [0, 1), got {lmbdas}")


def neighbour_recorder(control, k_max: int):
    """A :class:`~rcd.control.knn.KNNInterpolation` like ``control`` that searches k_max neighbours per
    scored row, keeps them (CPU), and applies the control with its own first k."""
    from rcd.control.knn import KNNInterpolation
    from rcd.datastore.tokens import Neighbours

    class NeighbourRecorder(KNNInterpolation):
        def __init__(self):
            super().__init__(k=control.k, lmbda=control.lmbda, temperature=control.temperature,
                             datastore=control.datastore)
            self.k_max = int(k_max)
            self.scores: list = []
            self.tokens: list = []
            self.metric = "l2"

        def apply(self, scores, *, input_ids=None, hidden=None, fire=None, **_):
            if fire is not None and not bool(fire.all()):
                raise ValueError("lm_knn_grid needs retrieval at every token (schedule every_token)")
            nb = self.datastore.search(hidden, self.k_max)
            self.scores.append(nb.scores.cpu())
            self.tokens.append(nb.tokens.cpu())
            own = Neighbours(scores=nb.scores[:, :self.k], ids=nb.ids[:, :self.k], tokens=nb.tokens[:, :self.k],
                             metric=nb.metric)
            self.metric = nb.metric
            return super().apply(scores, hidden=hidden, fire=None, neighbours=own)

    return NeighbourRecorder()


def grid_nll(nll_lm, scores, tokens, targets, ks, lmbdas, temperature: float, metric: str = "l2") -> dict:
    """Per-token NLL of (1-λ)·p_LM + λ·p_kNN at every (k, λ), from the k_max nearest neighbours.

    ``nll_lm`` [N] = -log p_LM(target), ``scores``/``tokens`` [N, k_max] sorted nearest first,
    ``targets`` [N]; p_kNN(target) from the first k neighbours (:func:`rcd.control.knn.knn_target_probs`).
    Returns {(k, λ): nll [N] (float64)}.
    """
    from rcd.control.knn import knn_target_probs

    p_lm = np.exp(-np.asarray(nll_lm, dtype=np.float64))
    out = {}
    for k in ks:
        p_knn = knn_target_probs(scores[:, :k].float(), tokens[:, :k], targets, temperature, metric).double().numpy()
        for lam in lmbdas:
            with np.errstate(divide="ignore"):
                out[(int(k), float(lam))] = -np.log((1.0 - lam) * p_lm + lam * p_knn)
    return out


def run(cfg, lm, strategy, heldout_ds, provenance) -> dict:
    """The task (``_target_`` of ``conf/task/lm_knn_grid.yaml``); see the module docstring."""
    import torch

    from rcd.control.knn import KNNInterpolation
    from rcd.paper.stats import perplexity_ci
    from rcd.tasks import lm as lm_task
    from rcd.tasks import perplexity

    ctl = strategy.control
    if not isinstance(ctl, KNNInterpolation):
        raise ValueError(f"lm_knn_grid needs the kNN-LM control (+strategy=per_token), got {type(ctl).__name__}")
    if strategy.schedule is not None and getattr(strategy.schedule, "name", "") != "every_token":
        raise ValueError("lm_knn_grid needs retrieval at every token (strategy/schedule=every_token)")
    t = cfg.task
    ks = sorted({int(k) for k in t.grid_ks})
    lmbdas = sorted({float(x) for x in t.grid_lmbdas})
    rec = neighbour_recorder(ctl, max(ks + [ctl.k]))
    docs = lm_task.heldout_docs(lm, heldout_ds, t.eval_tokens, t.get("prefix_token"))
    ppl = perplexity.PerplexityResult.pool([perplexity.score(lm, d["ids"], rec, None, window=t.window, stride=t.stride)
                                           for d in docs])
    k_max = min(rec.k_max, len(ctl.datastore))
    scores = torch.cat(rec.scores)
    tokens = torch.cat(rec.tokens)
    targets = torch.cat([d["ids"][1:] for d in docs]).cpu()
    grid = grid_nll(ppl.nll_none, scores, tokens, targets, [min(k, k_max) for k in ks], lmbdas, ctl.temperature,
                    rec.metric)
    points = []
    for (k, lam), nll in sorted(grid.items()):
        e = perplexity_ci(nll)
        points.append({"k": k, "lmbda": lam, "perplexity": e.value, "ci_low": e.low, "ci_high": e.high})
    provenance.append({"task": "knn_grid", "k_max": k_max, "queries": int(scores.shape[0]),
                       "note": "neighbours searched once at k_max for all grid points"})
    per_example = {"nll_none": [round(float(x), 5) for x in ppl.nll_none],
                   "nll": [round(float(x), 5) for x in ppl.nll]}
    return {"metrics": {"perplexity": ppl.summary(), "generation": {},
                        "knn_grid": {"temperature": ctl.temperature, "k_max": k_max, "points": points}},
            "per_example": per_example, "samples": {}, "prompts": []}
