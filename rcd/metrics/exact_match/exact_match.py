"""Exact match (SQuAD normalisation), max over references, as an ``evaluate`` metric.

Load offline by path: ``evaluate.load("/abs/path/rcd/metrics/exact_match")`` or
``rcd.metrics.load_metric("exact_match")``.  The scoring itself is
:mod:`rcd.metrics` (one normalisation, one F1 for every module); ``evaluate`` copies this file
into its module cache, from where it imports the installed rcd.
"""

import datasets
import evaluate

from rcd.metrics import exact_match_score

_DESCRIPTION = """Exact match after SQuAD normalisation (lowercase, drop punctuation, drop the
articles a/an/the, collapse whitespace); an example scores 1 if the prediction matches any of
its references, else 0."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list[str], one answer per example.
    references: list[list[str]], the accepted answers per example (at least one each).
Returns:
    exact_match: float in [0, 1], the mean over examples.
    scores: list[float], one 0.0/1.0 per example.
Examples:
    >>> m = evaluate.load("rcd/metrics/exact_match")
    >>> m.compute(predictions=["The Cat!"], references=[["cat", "dog"]])
    {'exact_match': 1.0, 'scores': [1.0]}
"""

_CITATION = """@inproceedings{rajpurkar2016squad,
  title={SQuAD: 100,000+ Questions for Machine Comprehension of Text},
  author={Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle={EMNLP}, year={2016}}"""

@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references):
        if any(len(r) == 0 for r in references):
            raise ValueError("every example needs at least one reference")
        scores = [exact_match_score(p, r) for p, r in zip(predictions, references)]
        return {"exact_match": sum(scores) / len(scores), "scores": scores}
