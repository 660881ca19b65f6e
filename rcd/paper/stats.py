"""What a run computed, read from its ``results.json``, with bootstrap confidence intervals.

Uncertainty: perplexity's 95% interval is a percentile bootstrap over scored tokens of the mean
NLL, then exp (tokens of one text are not independent, so the interval is optimistic);
the change against the plain model is a paired bootstrap of the mean per-token NLL difference
(ppl'/ppl - 1 = exp(mean(NLL' - NLL)) - 1); exact match and F1 are bootstrapped over questions.
Speed numbers (tokens/s, time to first token) get no interval. All resampling uses
``rcd.metrics.bootstrap_ci`` with 1000 resamples and seed 0, so tables are reproducible.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from rcd.metrics import bootstrap_ci
from rcd.paper.experiments import dig


N_RESAMPLES = 1000
SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A point estimate with an optional 95% interval."""

    value: float
    low: Optional[float] = None
    high: Optional[float] = None


def mean_ci(values: Sequence[float]) -> Estimate:
    """Mean with a percentile-bootstrap 95% interval (1000 resamples, seed 0)."""
    m, lo, hi = bootstrap_ci(values, n_resamples=N_RESAMPLES, seed=SEED)
    return Estimate(m, lo, hi)


def perplexity_ci(nll: Sequence[float]) -> Estimate:
    """exp of the mean per-token NLL, with exp of the bootstrap interval of that mean."""
    m, lo, hi = bootstrap_ci(nll, n_resamples=N_RESAMPLES, seed=SEED)
    return Estimate(math.exp(m), math.exp(lo), math.exp(hi))


def relative_change_ci(nll: Sequence[float], nll_base: Sequence[float]) -> Estimate:
    """ppl/ppl_base - 1 with a paired bootstrap interval over tokens (same tokens, same resamples)."""
    a, b = np.asarray(nll, dtype=np.float64), np.asarray(nll_base, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired NLL lists differ in length: {a.shape} vs {b.shape}")
    m, lo, hi = bootstrap_ci(a - b, n_resamples=N_RESAMPLES, seed=SEED)
    return Estimate(math.expm1(m), math.expm1(lo), math.expm1(hi))


def is_qa(res: dict) -> bool:
    return isinstance(dig(res, "metrics.qa"), dict)


def qa_metrics(res: dict) -> dict:
    return dig(res, "metrics.qa", {}) or {}


def _per_example(res: dict, *names: str) -> Optional[list]:
    pe = res.get("per_example") or {}
    for n in names:
        v = pe.get(n)
        if isinstance(v, list) and v and not isinstance(v[0], (dict, list)):
            return v
    return None


def _ci_or_point(values: Optional[list], point: Optional[float]) -> Optional[Estimate]:
    if values:
        return mean_ci([float(x) for x in values])
    return Estimate(float(point)) if point is not None else None


def exact_match(res: dict) -> Optional[Estimate]:
    return _ci_or_point(_per_example(res, "em", "exact_match"), qa_metrics(res).get("exact_match"))


def token_f1(res: dict) -> Optional[Estimate]:
    return _ci_or_point(_per_example(res, "f1", "token_f1"), qa_metrics(res).get("f1", qa_metrics(res).get("token_f1")))


def answer_in_output(res: dict) -> Optional[float]:
    """Answer containment of the QA task (``metrics.qa.contains``); None for runs made before it existed."""
    return qa_metrics(res).get("contains")


def lm_perplexity(res: dict) -> Optional[Estimate]:
    """Perplexity with the strategy (the plain model's for a baseline run)."""
    pe = res.get("per_example") or {}
    nll = pe.get("nll") or pe.get("nll_none")
    if nll:
        return perplexity_ci(nll)
    p = dig(res, "metrics.perplexity", {})
    v = p.get("perplexity", p.get("perplexity_none"))
    return Estimate(v) if v is not None else None


def lm_change(res: dict) -> Optional[Estimate]:
    pe = res.get("per_example") or {}
    if pe.get("nll") and pe.get("nll_none"):
        return relative_change_ci(pe["nll"], pe["nll_none"])
    v = dig(res, "metrics.perplexity.relative_change")
    return Estimate(v) if v is not None else None


def is_baseline(res: dict) -> bool:
    return dig(res, "run.strategy") == "none"


def retrieval_rate(res: dict) -> Optional[float]:
    if is_baseline(res):
        return 0.0
    if is_qa(res):
        return qa_metrics(res).get("retrieval_rate")
    return dig(res, "metrics.perplexity.retrieval_rate", dig(res, "metrics.schedule.retrieval_rate"))


def tokens_per_second(res: dict) -> Optional[float]:
    if is_qa(res):
        return qa_metrics(res).get("tokens_per_second")
    name = "none" if is_baseline(res) else dig(res, "run.strategy")
    return dig(res, f"metrics.generation.{name}.tokens_per_second")


def time_to_first_token(res: dict) -> Optional[float]:
    if is_qa(res):
        return qa_metrics(res).get("time_to_first_token")
    name = "none" if is_baseline(res) else dig(res, "run.strategy")
    return dig(res, f"metrics.generation.{name}.time_to_first_token")


def throughput_ratio(res: dict) -> Optional[float]:
    """Decode tokens/s with the strategy ÷ without, measured in the same process."""
    if is_baseline(res):
        return 1.0 if dig(res, "metrics.generation.none.tokens_per_second") else None
    return dig(res, "metrics.generation.throughput_ratio")


def datastore_build_seconds(res: dict) -> Optional[float]:
    """One-time build time of the run's datastore, from its ``manifest.json`` (None if not on this machine)."""
    folder = dig(res, "datastore.folder")
    if not folder or not (Path(folder) / "manifest.json").is_file():
        return None
    return json.loads((Path(folder) / "manifest.json").read_text()).get("build_seconds")
#: result keys measured in time, not computed from the data: they differ between two runs of one config
_TIMING_WORDS = ("second", "time", "ttft", "wall", "tokens_per_s", "throughput")


def computed_values(res: dict) -> dict[str, Any]:
    """Every value a run *computed* (metrics, samples, per-example scores, the datastore's size), flattened
    to ``"a.b[i]": value``, without what is measured in time (``*_s``, tokens/s, time to first token) or
    names the machine (folders, argv). Two runs of one config on any launcher must agree on all of it."""
    out: dict[str, Any] = {}

    def walk(x: Any, path: str) -> None:
        leaf = path.rsplit(".", 1)[-1].split("[", 1)[0]
        if leaf.endswith("_s") or leaf.endswith("_ms") or any(w in leaf for w in _TIMING_WORDS):
            return
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        else:
            out[path] = x

    for key in ("metrics", "samples", "per_example", "predictions", "leak_check"):
        if key in res:
            walk(res[key], key)
    if isinstance(res.get("datastore"), dict) and "size" in res["datastore"]:
        out["datastore.size"] = res["datastore"]["size"]
    return out


def quality(res: dict) -> Optional[Estimate]:
    """The task's headline quality: exact match (QA) or perplexity (lm)."""
    return exact_match(res) if is_qa(res) else lm_perplexity(res)
