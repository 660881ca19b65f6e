"""Answer containment (SQuAD normalisation, whole words), max over references, as an ``evaluate`` metric.

Load offline by path: ``evaluate.load("/abs/path/rcd/metrics/answer_in_prediction")`` or
``rcd.metrics.load_metric("answer_in_prediction")``.  The scoring itself is
:mod:`rcd.metrics` (one normalisation, one F1 for every module); ``evaluate`` copies this file
into its module cache, from where it imports the installed rcd.
"""

import datasets
import evaluate

from rcd.metrics import answer_in_prediction_score

_DESCRIPTION = """Answer containment ("has_answer" in DPR, accuracy in PopQA and Self-RAG): an example scores 1
if it is an exact match (SQuAD normalisation) or if any of its references occurs in the
prediction as a contiguous sequence of whole words (lowercased, split at whitespace and
punctuation, articles a/an/the dropped), else 0.  "7" is not in "17"; "Pd" is in "The chemical
symbol of palladium is Pd."; "1858" is in "(1858-1913)"."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list[str], one model output per example.
    references: list[list[str]], the accepted answers per example (at least one each).
Returns:
    answer_in_prediction: float in [0, 1], the mean over examples.
    scores: list[float], one 0.0/1.0 per example.
Examples:
    >>> m = evaluate.load("rcd/metrics/answer_in_prediction")
    >>> m.compute(predictions=["The symbol of palladium is Pd.", "In 1807."], references=[["Pd"], ["7"]])
    {'answer_in_prediction': 0.5, 'scores': [1.0, 0.0]}
"""

_CITATION = """@inproceedings{karpukhin2020dense,
  title={Dense Passage Retrieval for Open-Domain Question Answering},
  author={Karpukhin, Vladimir and O{\\u{g}}uz, Barlas and Min, Sewon and Lewis, Patrick and Wu, Ledell
          and Edunov, Sergey and Chen, Danqi and Yih, Wen-tau},
  booktitle={EMNLP}, year={2020}}
@inproceedings{mallen2023popqa,
  title={When Not to Trust Language Models: Investigating Effectiveness of Parametric and
         Non-Parametric Memories},
  author={Mallen, Alex and Asai, Akari and Zhong, Victor and Das, Rajarshi and Khashabi, Daniel
          and Hajishirzi, Hannaneh},
  booktitle={ACL}, year={2023}}"""

@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AnswerInPrediction(evaluate.Metric):
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
        scores = [answer_in_prediction_score(p, r) for p, r in zip(predictions, references)]
        return {"answer_in_prediction": sum(scores) / len(scores), "scores": scores}
