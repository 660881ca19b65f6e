"""Token-level F1 (SQuAD normalisation), max over references, as an ``evaluate`` metric.

Load offline by path: ``evaluate.load("/abs/path/rcd/metrics/token_f1")`` or
``rcd.metrics.load_metric("token_f1")``.  The scoring itself is
:mod:`rcd.metrics` (one normalisation, one F1 for every module); ``evaluate`` copies this file
into its module cache, from where it imports the installed rcd.
"""

import datasets
import evaluate

from rcd.metrics import token_f1_score

_DESCRIPTION = """Bag-of-tokens F1 between prediction and reference after SQuAD normalisation
(lowercase, drop punctuation, drop the articles a/an/the, split on whitespace); an example takes
the best F1 over its references.  Two empty token lists score 1, one empty list scores 0."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list[str], one answer per example.
    references: list[list[str]], the accepted answers per example (at least one each).
Returns:
    token_f1: float in [0, 1], the mean over examples.
    scores: list[float], the per-example F1 in [0, 1].
Examples:
    >>> m = evaluate.load("rcd/metrics/token_f1")
    >>> m.compute(predictions=["the big red dog"], references=[["red dog barks"]])["token_f1"]
    0.6666666666666666
"""

_CITATION = """@inproceedings{rajpurkar2016squad,
  title={SQuAD: 100,000+ Questions for Machine Comprehension of Text},
  author={Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle={EMNLP}, year={2016}}"""

@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TokenF1(evaluate.Metric):
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
        scores = [token_f1_score(p, r) for p, r in zip(predictions, references)]
        return {"token_f1": sum(scores) / len(scores), "scores": scores}
