"""Short-answer QA: exact match and token F1 of answers decoded by the engine, with and without retrieval.

Questions come from a jsonl file (``task.path``; fields mapped by ``question_field``,
``answers_field``, ``gold_field``, ``id_field``), optionally filtered (``task.filter``: field ->
value or list of values) and sampled (``n`` examples, ``seed``; kept in file order). Each question
becomes the user message ``prompt.format(question=..., instruction=...)`` under the task's
template (chat template when the model has one) and is decoded greedily by
:class:`rcd.engine.Engine` for ``max_new_tokens``. The step-0 retrieval query is the question.

Prediction: the first line of the generated text; with ``answer_regex`` the first match of the
regex in it (e.g. the first 1-4 digit number for years), else that line. Metrics (0-1):

* ``exact_match`` / ``f1`` — :func:`rcd.metrics.load_metric` ("exact_match", "token_f1") over the
  predictions; ``exact_match_raw`` on the unextracted first line;
* ``contains`` — answer containment ("answer_in_prediction": a normalised reference occurs in the
  normalised unextracted first line as whole words, e.g. "Pd" in "The symbol of palladium is Pd.";
  the has_answer / accuracy of DPR, PopQA, Self-RAG), with ``contains_ci`` like ``exact_match_ci``;
* ``recall`` — recall@k (:func:`rcd.metrics.recall_at_k`) of the gold passage in the first
  retrieval of each question, over the questions that retrieved (``None`` if none did, or if the
  datastore returns no passage ids, e.g. tags / memories);
* ``retrieval_rate`` — row retrievals / decoding steps; ``retrievals_per_question``;
* ``tokens_per_second``, ``time_to_first_token`` (mean over batches) from the engine's cost.

``baseline: true`` also decodes without retrieval in the same process (``metrics.none``).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Optional

from rcd import calibrate
from rcd.engine import Engine, Request, from_config
from rcd.errors import RcdError
from rcd.metrics import bootstrap_ci, load_metric, recall_at_k

REPO = Path(__file__).resolve().parents[2]


class QAError(RcdError):
    pass


def resolve_path(path: str) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        return p
    if not p.is_absolute() and (REPO / p).exists():
        return REPO / p
    hint = " (make it with `python scripts/make_wordnet_qa.py`)" if "wordnet" in str(path) else ""
    raise QAError(f"task.path: QA file {path!r} does not exist{hint}")


def read_rows(path: str, question_field: str = "question", answers_field: str = "answers") -> list[dict]:
    """Every row of a QA jsonl file, each checked: valid JSON, UTF-8, a non-empty question string and at
    least one non-empty answer. A bad row is refused with its line number."""
    from rcd.corpus import CorpusError, check_json_lines

    file = resolve_path(path)
    try:
        check_json_lines(file, [question_field, answers_field], what="QA file")
    except CorpusError as e:
        raise QAError(str(e)) from None
    rows = []
    with file.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            q = r[question_field]
            if not isinstance(q, str) or not q.strip():
                raise QAError(f"QA file {file}: line {line_no} has an empty or non-string {question_field!r} ({q!r}); "
                              "give every row a question, or remove the row")
            answers = r[answers_field]
            answers = answers if isinstance(answers, (list, tuple)) else [answers]
            if not answers or any(a is None or not str(a).strip() for a in answers):
                raise QAError(f"QA file {file}: line {line_no} has no usable {answers_field!r} ({r[answers_field]!r}); "
                              "give a non-empty answer or list of answers")
            r["_line"] = line_no
            rows.append(r)
    return rows


def load_examples(path: str, *, question_field: str = "question", answers_field: str = "answers",
                  gold_field: Optional[str] = "gold_id", id_field: Optional[str] = "id", n: Optional[int] = None,
                  seed: int = 0, filter: Optional[dict] = None) -> list[dict]:
    """Read, filter and sample QA records as ``{id, question, answers, gold}`` (file order kept)."""
    rows = read_rows(path, question_field, answers_field)
    if gold_field and gold_field not in rows[0]:
        raise QAError(f"QA file {path!r} has no field {gold_field!r} (task.gold_field); fields: "
                      f"{sorted(k for k in rows[0] if k != '_line')}. Set task.gold_field=null to skip recall")
    for key, want in (filter or {}).items():
        allowed = set(want) if isinstance(want, (list, tuple)) else {want}
        rows = [r for r in rows if r.get(key) in allowed]
        if not rows:
            raise QAError(f"task.filter: no QA example has {key} in {sorted(map(str, allowed))}")
    if n is not None and int(n) < len(rows):
        keep = sorted(random.Random(int(seed)).sample(range(len(rows)), int(n)))
        rows = [rows[i] for i in keep]
    out = []
    for i, r in enumerate(rows):
        answers = r[answers_field]
        answers = [str(a) for a in (answers if isinstance(answers, (list, tuple)) else [answers])]
        out.append({"id": str(r[id_field]) if id_field and id_field in r else str(i), "question": str(r[question_field]),
                    "answers": answers, "gold": r.get(gold_field) if gold_field else None})
    return out


def validate(cfg) -> None:
    """Start-up checks of the QA task (rcd.validate): parameters and every row of the QA file."""
    from rcd.validate import check_long_prompt, positive_int

    t = cfg.task
    if not t.get("path"):
        raise QAError("task.path: no QA file given: set task.path=<your questions .jsonl> (one JSON object per "
                      "line with task.question_field and task.answers_field), or use task=qa_wordnet / qa_mendeleev")
    positive_int("task.max_new_tokens", t.get("max_new_tokens"))
    positive_int("task.batch_size", t.get("batch_size", 8))
    positive_int("task.n", t.get("n"), allow_none=True)
    positive_int("task.recall_k", t.get("recall_k"), allow_none=True)
    check_long_prompt(cfg)
    if t.get("answer_regex"):
        try:
            re.compile(t.answer_regex)
        except re.error as e:
            raise QAError(f"task.answer_regex={t.answer_regex!r} is not a valid regular expression ({e})") from None
    fmt = t.get("prompt") or "{question}\n{instruction}"
    try:
        fmt.format(question="q", instruction="i")
    except (KeyError, IndexError, ValueError) as e:
        raise QAError(f"task.prompt={fmt!r} may only use {{question}} and {{instruction}} ({e!r})") from None
    from rcd.validate import one_of

    one_of("task.prompt_style", t.get("prompt_style", "auto"), PROMPT_STYLES)
    positive_int("task.shots", t.get("shots", 0), minimum=0)
    comp = t.get("completion_prompt") or COMPLETION
    try:
        comp.format(question="q")
    except (KeyError, IndexError, ValueError) as e:
        raise QAError(f"task.completion_prompt={comp!r} may only use {{question}} ({e!r})") from None
    load_examples(t.path, question_field=t.question_field, answers_field=t.answers_field,
                  gold_field=t.get("gold_field"), id_field=t.get("id_field"), n=t.get("n"),
                  seed=int(t.get("seed", cfg.get("seed", 0))), filter=t.get("filter"))


def validate_with_model(cfg, lm) -> None:
    from rcd.control.context import PromptTemplate
    from rcd.validate import check_generation_fits

    check_generation_fits(cfg, lm)
    t = cfg.task
    if int(t.get("shots") or 0) and str(t.get("prompt_style") or "auto") == "auto":
        from omegaconf import OmegaConf

        tmpl = PromptTemplate.from_config(OmegaConf.to_container(t.template, resolve=True) if t.get("template") else {})
        control_chat = OmegaConf.select(cfg, "strategy.control.template.chat")
        if control_chat:
            tmpl = tmpl.updated({"chat": control_chat})
        if tmpl.uses_chat(lm.tokenizer):
            raise QAError(f"task.shots={t.shots}: solved examples go before a completion prompt, but {lm.name!r} "
                          "reads QA through its chat template (task.prompt_style=auto); set task.prompt_style="
                          "completion to use them, or task.shots=0")


def extract_answer(text: str, regex: Optional[str] = None) -> str:
    """First non-empty line of ``text``; with ``regex``, its first match there (whole line if none)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    if regex:
        m = re.search(regex, line)
        if m:
            return m.group(0)
    return line


#: ``task.prompt_style``: auto = instruction when the prompt goes through the model's chat template, else completion
PROMPT_STYLES = ("auto", "instruction", "completion")
COMPLETION = "Question: {question}\nAnswer:"


def prompt_style(t, engine: Engine) -> str:
    """``instruction`` (``task.prompt``: the question and ``task.instruction``, for chat models) or
    ``completion`` (``task.completion_prompt``, ``Question: ...\nAnswer:``, after ``task.shots`` solved
    examples: what a base model without a chat template continues with an answer)."""
    style = str(t.get("prompt_style") or "auto")
    if style == "auto":
        style = "instruction" if engine.template.uses_chat(engine.tok) else "completion"
    return style


def shot_examples(t, evaluated: list[dict], pool: list[dict]) -> list[dict]:
    """``task.shots`` examples of the QA file that are not evaluated, drawn with ``task.seed``."""
    n = int(t.get("shots") or 0)
    if n == 0:
        return []
    used = {ex["id"] for ex in evaluated}
    rest = [ex for ex in pool if ex["id"] not in used]
    if len(rest) < n:
        raise QAError(f"task.shots={n}: only {len(rest)} questions of task.path are not evaluated; lower task.shots "
                      "or task.n")
    rng = random.Random(int(t.get("seed") or 0) + 1)
    return [rest[i] for i in sorted(rng.sample(range(len(rest)), n))]


def shots_preamble(t, shots: Optional[list[dict]]) -> str:
    """The solved ``shots`` as ``task.completion_prompt`` + their first answer each, the template's preamble: the
    model reads them first, then the passages retrieved for the question, then the question."""
    fmt = t.get("completion_prompt") or COMPLETION
    return "".join(f"{fmt.format(question=ex['question'])} {ex['answers'][0]}\n\n" for ex in shots or [])


def with_shots(engine: Engine, t, shots: Optional[list[dict]]) -> Engine:
    """``engine`` reading :func:`shots_preamble` before every prompt (its template's ``preamble``)."""
    engine.template = engine.template.updated({"preamble": shots_preamble(t, shots)})
    return engine


def requests(examples: list[dict], t, style: str = "instruction") -> list[Request]:
    """The engine requests of ``examples`` in ``style`` (:func:`prompt_style`): ``task.prompt`` with the question
    and ``task.instruction``, or ``task.completion_prompt`` (solved shots come from the engine's template:
    :func:`with_shots`)."""
    if style == "completion":
        fmt = t.get("completion_prompt") or COMPLETION
        return [Request(prompt=fmt.format(question=ex["question"]), query=ex["question"], id=ex["id"])
                for ex in examples]
    instruction = t.get("instruction") or ""
    fmt = t.get("prompt") or "{question}\n{instruction}"
    return [Request(prompt=fmt.format(question=ex["question"], instruction=instruction).strip(), query=ex["question"],
                    id=ex["id"]) for ex in examples]


def decode_split(engine: Engine, examples: list[dict], t, style: str = "instruction") -> dict[str, Any]:
    """Decode every example with ``engine`` (:func:`with_shots` for solved examples); metrics (see module doc) and
    per-example records."""
    out = engine.generate(requests(examples, t, style))
    regex = t.get("answer_regex")
    preds = [extract_answer(x, regex) for x in out.texts]
    raw = [extract_answer(x, None) for x in out.texts]
    refs = [ex["answers"] for ex in examples]
    em = load_metric("exact_match").compute(predictions=preds, references=refs)
    f1 = load_metric("token_f1").compute(predictions=preds, references=refs)
    em_raw = load_metric("exact_match").compute(predictions=raw, references=refs)
    contains = load_metric("answer_in_prediction").compute(predictions=raw, references=refs)
    k = int(t.get("recall_k") or engine.k)
    first: dict[int, list[str]] = {}
    for rec in out.provenance:
        if "doc_ids" in rec and rec.get("event") is None and rec["row"] not in first:
            first[rec["row"]] = [d for d, i in zip(rec["doc_ids"], rec["ids"]) if i >= 0]
    rows = [i for i in range(len(examples)) if i in first and examples[i]["gold"] is not None]
    recall = recall_at_k([first[i] for i in rows], [examples[i]["gold"] for i in rows], k) if rows else None
    cost = out.cost
    mean, lo, hi = bootstrap_ci(em["scores"])
    _, c_lo, c_hi = bootstrap_ci(contains["scores"])
    metrics = {
        "exact_match": em["exact_match"], "exact_match_ci": [lo, hi], "f1": f1["token_f1"],
        "exact_match_raw": em_raw["exact_match"], "contains": contains["answer_in_prediction"],
        "contains_ci": [c_lo, c_hi], "recall": recall, "recall_k": k, "recall_n": len(rows),
        "retrieval_rate": cost["retrieval_rate"], "retrievals_per_question": cost["retrievals"] / len(examples),
        "tokens_per_second": cost["tokens_per_s"], "time_to_first_token": cost["ttft"],
        "questions": len(examples), "cost": cost,
    }
    per_example = [{"id": ex["id"], "question": ex["question"], "answers": ex["answers"], "gold": ex["gold"],
                    "output": txt, "prediction": p, "em": e, "f1": f, "contains": c, "retrieved": first.get(i, [])}
                   for i, (ex, txt, p, e, f, c) in enumerate(zip(examples, out.texts, preds, em["scores"], f1["scores"],
                                                                 contains["scores"]))]
    return {"metrics": metrics, "examples": per_example, "provenance": out.provenance}


def run(cfg, lm, strategy, heldout_ds, provenance) -> dict:
    """QA task entry point (``task._target_: rcd.tasks.qa.run``); ``heldout_ds`` is not used."""
    t = cfg.task
    fields = dict(question_field=t.question_field, answers_field=t.answers_field, gold_field=t.get("gold_field"),
                  id_field=t.get("id_field"), filter=t.get("filter"))
    examples = load_examples(t.path, n=t.get("n"), seed=int(t.get("seed", cfg.get("seed", 0))), **fields)
    common = dict(max_new_tokens=int(t.max_new_tokens), batch_size=int(t.get("batch_size", 8)))
    results: dict[str, Any] = {}
    engine = from_config(lm, strategy if not strategy.is_baseline else None, cfg, task="qa", provenance=provenance,
                         **common)
    style = prompt_style(t, engine)
    pool = load_examples(t.path, **fields) if int(t.get("shots") or 0) or \
        calibrate.wants_calibration(getattr(strategy, "schedule", None)) else []
    shots = shot_examples(t, examples, pool) if style == "completion" else []
    with_shots(engine, t, shots)
    if t.get("baseline", True) and not strategy.is_baseline:
        plain = with_shots(from_config(lm, None, cfg, task="qa", provenance=[], **common), t, shots)
        results["none"] = decode_split(plain, examples, t, style)
    calibration = None
    if calibrate.wants_calibration(getattr(strategy, "schedule", None)):  # θ from questions not evaluated
        calib_engine = with_shots(from_config(lm, strategy, cfg, task="qa", provenance=[], **common), t, shots)
        shot_ids = {ex["id"] for ex in shots}
        calibration = calibrate.calibrate_qa(calib_engine, strategy, examples,
                                             [ex for ex in pool if ex["id"] not in shot_ids],
                                             lambda exs: requests(exs, t, style),
                                             int(t.get("calibration_questions") or 32))
    main = decode_split(engine, examples, t, style)
    sched = getattr(strategy, "schedule", None)
    metrics: dict[str, Any] = {"qa": main["metrics"]}
    # which prompt the model read: the style, the solved examples before each question, one rendered prompt
    metrics["prompt"] = {"style": style, "shots": len(shots), "shot_ids": [ex["id"] for ex in shots],
                         "example": engine.template.render(engine.tok, requests(examples[:1], t, style)[0].prompt)}
    if calibration is not None:
        metrics["calibration"] = dict(calibration, achieved_rate=main["metrics"]["retrieval_rate"])
    if "none" in results:
        metrics["none"] = results["none"]["metrics"]
    if sched is not None and hasattr(sched, "log_stats"):
        # logs the rate (the engine's: one retrieval rate per run); Adaptive warns if degenerate
        metrics["schedule"] = sched.log_stats(rate=main["metrics"]["retrieval_rate"])
    pe = main["examples"]
    return {"metrics": metrics, "per_example": {"em": [x["em"] for x in pe], "f1": [x["f1"] for x in pe],
                                                "contains": [x["contains"] for x in pe], "examples": pe},
            "samples": {"none": [x["output"] for x in results["none"]["examples"]] if "none" in results else [],
                        strategy.name: [x["output"] for x in pe]}}


def summary_rows(strategy_name: str, res: dict, datastore_size) -> list[list[str]]:
    """Rows for ``rcd.run``'s table: the closed-book baseline (when run) and the strategy."""
    def num(q, key, fmt=".3f"):
        return "-" if q.get(key) is None else format(q[key], fmt)

    def row(name, q):
        return [name, num(q, "exact_match"), num(q, "f1"), num(q, "contains"), num(q, "recall"),
                num(q, "retrieval_rate"), num(q, "retrievals_per_question", ".2f"), num(q, "tokens_per_second", ".1f"),
                num(q, "time_to_first_token")]

    m = res["metrics"]
    # exact match is often 0 for a small model that answers in sentences: answer-in-output is the one that moves
    rows = [["strategy", "exact match", "F1", "answer in output", f"recall@{m['qa'].get('recall_k', '-')}",
             "retrieval rate (share of steps)", "retrievals / question", "tok/s", "time to 1st tok (s)"]]
    if "none" in m:
        rows.append(row("none", m["none"]))
    rows.append(row(strategy_name, m["qa"]))
    return rows
