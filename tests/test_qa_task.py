"""QA task: data loading, answer extraction, metrics against hand-computed values, an end-to-end run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import tiny_llama
from rcd.engine import Output
from rcd.errors import RcdError
from rcd.metrics import bootstrap_ci
from rcd.tasks import qa

QA = [
    {"id": "q1", "question": "In what year was Alvar Aalto born?", "answers": ["1898"], "gold_id": "wn-1", "kind": "born"},
    {"id": "q2", "question": "In what year did Alvar Aalto die?", "answers": ["1976"], "gold_id": "wn-1", "kind": "died"},
    {"id": "q3", "question": "In what year was Niels Abel born?", "answers": ["1802"], "gold_id": "wn-2", "kind": "born"},
    {"id": "q4", "question": "In what year was Tycho Brahe born?", "answers": ["1546"], "gold_id": "wn-3", "kind": "born"},
]
PASSAGES = [
    {"id": "wn-1", "title": "Aalto", "text": "Aalto, Alvar Aalto: Finnish architect (1898-1976)"},
    {"id": "wn-2", "title": "Abel", "text": "Abel, Niels Abel: Norwegian mathematician (1802-1829)"},
    {"id": "wn-3", "title": "Brahe", "text": "Brahe, Tycho Brahe: Danish astronomer (1546-1601)"},
]


@pytest.fixture
def qa_file(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in QA))
    return p


def test_load_filter_sample_and_field_mapping(qa_file, tmp_path):
    ex = qa.load_examples(str(qa_file), filter={"kind": "born"})
    assert [e["id"] for e in ex] == ["q1", "q3", "q4"]
    assert ex[0] == {"id": "q1", "question": QA[0]["question"], "answers": ["1898"], "gold": "wn-1"}
    two = qa.load_examples(str(qa_file), n=2, seed=3)
    assert len(two) == 2 and [e["id"] for e in two] == sorted(e["id"] for e in two)  # file order kept
    assert two == qa.load_examples(str(qa_file), n=2, seed=3)  # seeded
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"q": "Who?", "a": "Me", "key": 7}) + "\n")
    ex = qa.load_examples(str(other), question_field="q", answers_field="a", gold_field=None, id_field="key")
    assert ex == [{"id": "7", "question": "Who?", "answers": ["Me"], "gold": None}]
    with pytest.raises(qa.QAError, match="no field 'answer'"):
        qa.load_examples(str(qa_file), answers_field="answer")
    with pytest.raises(qa.QAError, match="does not exist"):
        qa.load_examples(str(tmp_path / "missing.jsonl"))


def test_extract_answer():
    assert qa.extract_answer("\n  Alvar Aalto was born in 1898.\nMore", r"\d{1,4}") == "1898"
    assert qa.extract_answer("The year is unknown.\n1898", r"\d{1,4}") == "The year is unknown."
    assert qa.extract_answer("  1898-1976 \n", None) == "1898-1976"
    assert qa.extract_answer("", r"\d+") == ""


class ScriptedEngine:
    """Engine stand-in returning fixed outputs and provenance (metric plumbing only)."""

    k = 2

    def __init__(self, texts, prov, cost):
        self.texts, self.prov, self.cost = texts, prov, cost

    def generate(self, reqs):
        self.reqs = reqs
        return Output(texts=self.texts, token_ids=[[]] * len(reqs), cost=self.cost, provenance=self.prov,
                      retrieved=[], fired=[])


def test_metrics_hand_computed():
    ex = [{"id": q["id"], "question": q["question"], "answers": q["answers"], "gold": q["gold_id"]} for q in QA[:3]]
    texts = ["He was born in 1898.", "1976", "Niels Abel 1829"]
    prov = [  # row 0 retrieves the gold passage at rank 2, row 2 at rank 3 (outside k=2), row 1 never retrieves
        {"row": 0, "step": 0, "ids": [5, 0], "doc_ids": ["wn-9", "wn-1"], "scores": [2.0, 1.0]},
        {"row": 0, "step": 4, "ids": [1, -1], "doc_ids": ["wn-2", ""], "scores": [1.0, None]},
        {"row": 2, "step": 0, "ids": [3, 4, 1], "doc_ids": ["wn-7", "wn-8", "wn-2"], "scores": [3.0, 2.0, 1.0]},
    ]
    cost = {"retrievals": 3, "steps": 30, "retrieval_rate": 0.1, "tokens_per_s": 12.5, "ttft": 0.25,
            "tokens": 30, "wall_s": 2.4}
    t = OmegaConf.create({"instruction": "Answer with only the year.", "prompt": "{question}\n{instruction}",
                          "answer_regex": r"\d{1,4}", "recall_k": None})
    eng = ScriptedEngine(texts, prov, cost)
    r = qa.decode_split(eng, ex, t)
    m = r["metrics"]
    # predictions: 1898 (right), 1976 (right), 1829 (wrong: born 1802)
    assert [x["prediction"] for x in r["examples"]] == ["1898", "1976", "1829"]
    assert m["exact_match"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    # raw first lines: only "1976" equals an answer after normalisation
    assert m["exact_match_raw"] == pytest.approx(1 / 3)
    # answer in the raw first line as whole words: "1898" in "He was born in 1898.", "1976"; not "1802"
    assert m["contains"] == pytest.approx(2 / 3)
    assert [x["contains"] for x in r["examples"]] == [1.0, 1.0, 0.0]
    assert m["contains_ci"] == list(bootstrap_ci([1.0, 1.0, 0.0])[1:])
    # recall@2 over rows that retrieved (0 and 2), first retrieval only: row 0 hit, row 2 miss
    assert m["recall"] == 0.5 and m["recall_n"] == 2 and m["recall_k"] == 2
    assert m["retrieval_rate"] == 0.1 and m["retrievals_per_question"] == 1.0
    assert m["tokens_per_second"] == 12.5 and m["time_to_first_token"] == 0.25
    assert eng.reqs[0].prompt == "In what year was Alvar Aalto born?\nAnswer with only the year."
    assert eng.reqs[0].query == "In what year was Alvar Aalto born?" and eng.reqs[0].id == "q1"
    assert r["examples"][0]["retrieved"] == ["wn-9", "wn-1"]


def test_summary_rows():
    q = {"exact_match": 0.5, "f1": 0.625, "contains": 0.875, "recall": 0.75, "recall_k": 3, "retrieval_rate": 0.0625,
         "retrievals_per_question": 1.0, "tokens_per_second": 20.0, "time_to_first_token": 0.5}
    none = dict(q, recall=None, exact_match=0.0, contains=0.25, retrieval_rate=0.0, retrievals_per_question=0.0)
    rows = qa.summary_rows("once", {"metrics": {"qa": q, "none": none}}, 10)
    assert rows[0][:6] == ["strategy", "exact match", "F1", "answer in output", "recall@3",
                           "retrieval rate (share of steps)"]
    assert rows[1] == ["none", "0.000", "0.625", "0.250", "-", "0.000", "0.00", "20.0", "0.500"]
    assert rows[2] == ["once", "0.500", "0.625", "0.875", "0.750", "0.062", "1.00", "20.0", "0.500"]


def _setup(tmp_path):
    model, tok = tiny_llama()
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    qa_path = tmp_path / "qa.jsonl"
    qa_path.write_text("".join(json.dumps(r) + "\n" for r in QA))
    passages = tmp_path / "passages.jsonl"
    passages.write_text("".join(json.dumps(r) + "\n" for r in PASSAGES))
    return [f"model.name={folder}", "task=qa", "corpus=files", f"corpus.datastore.data_files={passages}",
            "corpus.datastore.id_field=id", f"corpus.heldout.data_files={passages}", f"task.path={qa_path}",
            "task.filter={kind:born}", "task.gold_field=gold_id", "task.n=null", "task.max_new_tokens=3", "task.batch_size=2", "datastore.retriever=bm25",
            "datastore.chunking=record", f"datastore_root={tmp_path / 'ds'}", f"runs_root={tmp_path / 'runs'}",
            "progress=false"]


def test_qa_end_to_end_with_rcd_run(tmp_path):
    from test_run import cfg_for

    from rcd.run import execute

    res = execute(cfg_for(["+strategy=once", "strategy.retrieval.k=1", "task.baseline=true"] + _setup(tmp_path)))
    m = res["metrics"]["qa"]
    assert m["questions"] == 3  # filter kind=born
    # BM25 finds each person's own passage first: recall@1 = 1
    assert m["recall"] == 1.0 and m["recall_n"] == 3
    assert m["retrievals_per_question"] == 1.0
    assert m["retrieval_rate"] == pytest.approx(3 / m["cost"]["steps"])
    assert res["metrics"]["none"]["retrieval_rate"] == 0.0 and res["metrics"]["none"]["recall"] is None
    assert len(res["per_example"]["em"]) == 3 and res["per_example"]["examples"][0]["retrieved"] == ["wn-1"]
    assert len(res["per_example"]["contains"]) == 3 and m["exact_match_raw"] <= m["contains"] <= 1.0
    assert "contains" in res["metrics"]["none"] and len(m["contains_ci"]) == 2
    prov = [json.loads(x) for x in (Path(res["run"]["folder"]) / "provenance.jsonl").read_text().splitlines()]
    assert [(p["id"], p["step"], p["doc_ids"]) for p in prov] == [("q1", 0, ["wn-1"]), ("q3", 0, ["wn-2"]),
                                                                   ("q4", 0, ["wn-3"])]
    assert prov[0]["query"] == QA[0]["question"]


def test_generic_qa_on_your_own_files_with_mapped_fields_and_no_heldout_file(tmp_path):
    """task=qa on a user's data: own field names (no `+`), no held-out file, neutral defaults (no filter,
    no answer regex: the whole first line is the prediction)."""
    from test_run import cfg_for

    from rcd.run import execute

    model, tok = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "passages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"pid": "p-aalto", "body": "Alvar Aalto was a Finnish architect born in 1898."},
        {"pid": "p-brahe", "body": "Tycho Brahe was a Danish astronomer born in 1546."}]))
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"qid": "a", "q": "Which architect was Finnish?", "a": "Alvar Aalto", "src": "p-aalto"},
        {"qid": "b", "q": "Which astronomer was Danish?", "a": ["Tycho Brahe", "Brahe"], "src": "p-brahe"}]))
    res = execute(cfg_for([
        "+strategy=once", "strategy.retrieval.k=1", "task=qa", f"task.path={tmp_path / 'questions.jsonl'}",
        "task.question_field=q", "task.answers_field=a", "task.id_field=qid", "task.gold_field=src",
        "task.max_new_tokens=3", "corpus=files", f"corpus.datastore.data_files={tmp_path / 'passages.jsonl'}",
        "corpus.datastore.text_field=body", "corpus.datastore.id_field=pid", "datastore.retriever=bm25",
        "datastore.chunking=record", f"model.name={tmp_path / 'm'}", f"datastore_root={tmp_path / 'ds'}",
        f"runs_root={tmp_path / 'runs'}", "progress=false"]))
    m, ex = res["metrics"]["qa"], res["per_example"]["examples"]
    assert m["questions"] == 2 and m["recall"] == 1.0  # BM25 finds each question's source passage by its pid
    assert [e["id"] for e in ex] == ["a", "b"] and [e["retrieved"] for e in ex] == [["p-aalto"], ["p-brahe"]]
    assert all(e["prediction"] == e["output"].strip().splitlines()[0].strip() for e in ex if e["output"].strip())


def test_generic_qa_without_a_path_is_refused_at_start_up():
    from rcd.paper.experiments import compose
    from rcd.validate import check_config

    with pytest.raises(RcdError, match="task.path: no QA file given"):
        check_config(compose(["+strategy=none", "task=qa"]))
