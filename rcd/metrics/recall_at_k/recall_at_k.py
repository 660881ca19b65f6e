"""Retrieval recall@k as an ``evaluate`` metric: the share of queries whose gold passage id is
among their top-k retrieved ids.

Load offline by path: ``evaluate.load("/abs/path/rcd/metrics/recall_at_k")`` or
``rcd.metrics.load_metric("recall_at_k")``; pass ``k`` to ``compute``.  Self-contained on
purpose: ``evaluate`` copies this one file into its module cache.
"""
import datasets
import evaluate

_DESCRIPTION = """Recall@k for retrieval with one gold passage per query: 1 for a query when its
gold id is among the first k retrieved ids, else 0; averaged over queries."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list[list[str]], retrieved passage ids per query, best first.
    references: list[str], the gold passage id per query.
    k: int >= 1, the cut-off (default 1).
Returns:
    recall_at_k: float in [0, 1], the mean over queries.
    scores: list[float], one 0.0/1.0 per query.
Examples:
    >>> m = evaluate.load("rcd/metrics/recall_at_k")
    >>> m.compute(predictions=[["a", "b"], ["c", "d"]], references=["b", "x"], k=2)
    {'recall_at_k': 0.5, 'scores': [1.0, 0.0]}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RecallAtK(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Value("string"),
                }
            ),
        )

    def _compute(self, predictions, references, k=1):
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        scores = [float(gold in list(ids)[:k]) for ids, gold in zip(predictions, references)]
        return {"recall_at_k": sum(scores) / len(scores), "scores": scores}
