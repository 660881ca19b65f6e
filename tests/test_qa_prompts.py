"""QA prompts for base models: without a chat template the question is a completion (``Question: ...\\nAnswer:``),
optionally after solved examples not evaluated; the style is stated in the results."""
import json

import pytest
from omegaconf import OmegaConf

from conftest import as_loaded, tiny_llama
from rcd.control import PromptTemplate
from rcd.control.context import Passage
from rcd.engine import Engine
from rcd.tasks.qa import QAError, prompt_style, requests, shot_examples, with_shots
from test_qa_task import _setup

EX = [{"id": "a", "question": "Symbol of gold?", "answers": ["Au", "au"]},
      {"id": "b", "question": "Symbol of iron?", "answers": ["Fe"]},
      {"id": "c", "question": "Symbol of tin?", "answers": ["Sn"]}]


def test_completion_prompt_hand_written():
    t = OmegaConf.create({"completion_prompt": "Question: {question}\nAnswer:", "instruction": "Only the answer.",
                          "prompt": "{question}\n{instruction}"})
    [r] = requests(EX[2:], t, "completion")
    assert r.prompt == "Question: Symbol of tin?\nAnswer:" and r.query == "Symbol of tin?"
    model, tok = tiny_llama()
    eng = with_shots(Engine(as_loaded(model, tok), None, template=PromptTemplate(header="Context:\n")), t, EX[:2])
    shots = "Question: Symbol of gold?\nAnswer: Au\n\nQuestion: Symbol of iron?\nAnswer: Fe\n\n"
    assert eng.template.render(tok, r.prompt) == shots + "Question: Symbol of tin?\nAnswer:"
    # the passages stand after the solved examples, next to the question they were retrieved for
    assert eng.template.render(tok, r.prompt, [Passage("Tin is Sn.")]) == \
        shots + "Context:\nTin is Sn.\n\nQuestion: Symbol of tin?\nAnswer:"
    [r] = requests(EX[2:], t, "instruction")
    assert r.prompt == "Symbol of tin?\nOnly the answer."


def test_style_follows_the_chat_template():
    model, tok = tiny_llama()
    lm = as_loaded(model, tok)
    t = OmegaConf.create({"prompt_style": "auto"})
    auto = PromptTemplate(chat="auto")
    assert prompt_style(t, Engine(lm, None, template=auto)) == "completion"  # no chat template: a base model
    tok.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    assert prompt_style(t, Engine(lm, None, template=auto)) == "instruction"
    assert prompt_style(t, Engine(lm, None, template=PromptTemplate(chat="never"))) == "completion"
    assert prompt_style(OmegaConf.create({"prompt_style": "completion"}), Engine(lm, None, template=auto)) == "completion"


def test_shots_are_drawn_from_questions_not_evaluated():
    t = OmegaConf.create({"shots": 2, "seed": 0})
    got = shot_examples(t, EX[:1], EX)
    assert [e["id"] for e in got] == ["b", "c"]
    with pytest.raises(QAError, match="task.shots=3: only 2 questions of task.path are not evaluated"):
        shot_examples(OmegaConf.create({"shots": 3}), EX[:1], EX)


def test_base_model_qa_run_states_its_prompt(tmp_path):
    from test_run import cfg_for

    from rcd.run import execute

    res = execute(cfg_for(["+strategy=once", "strategy.retrieval.k=1"] + _setup(tmp_path) + ["task.n=2", "task.shots=1"]))
    p = res["metrics"]["prompt"]
    assert p["style"] == "completion" and p["shots"] == 1 and len(p["shot_ids"]) == 1
    evaluated = {e["id"] for e in res["per_example"]["examples"]}
    assert p["shot_ids"][0] not in evaluated
    assert p["example"].startswith("Question: ") and p["example"].endswith("\nAnswer:")
    assert p["example"].count("Question: ") == 2  # one solved example, then the question
    with pytest.raises(Exception, match="task.prompt_style: must be one of"):
        execute(cfg_for(["+strategy=once"] + _setup(tmp_path) + ["task.prompt_style=chat"]))


def test_shots_with_a_chat_model_are_refused_not_ignored(tmp_path):
    from test_run import cfg_for

    from rcd.run import execute

    over = _setup(tmp_path)
    folder = tmp_path / "tiny-model"
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(QAError, match="task.shots=1: solved examples go before a completion prompt"):
        execute(cfg_for(["+strategy=once"] + over + ["task.n=2", "task.shots=1"]))
