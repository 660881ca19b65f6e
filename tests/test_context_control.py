"""Context control: prompt templates (plain and chat), overrides, and re-prefill against a fresh forward."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from rcd.control.context import ContextControl, Passage, PromptTemplate
from rcd.engine import Engine, Request
from rcd.schedule import EveryN
from rcd.strategy import Strategy, StrategyError, validate
from test_engine import DOCS, FakeChunks

P1 = Passage("Aalto, Alvar Aalto: Finnish architect (1898-1976)", "wn-1", 9.5, 1)
P2 = Passage("Abel, Niels Abel: Norwegian mathematician (1802-1829)", "wn-2", 3.0, 2)

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_plain_template_hand_written():
    t = PromptTemplate(header="Context:\n", passage="{rank}. {text} [{doc_id}]", joiner="\n", footer="\n\n")
    assert t.render(None, "Q?", [P1, P2]) == (
        "Context:\n1. Aalto, Alvar Aalto: Finnish architect (1898-1976) [wn-1]\n"
        "2. Abel, Niels Abel: Norwegian mathematician (1802-1829) [wn-2]\n\nQ?")
    assert t.render(None, "Q?", []) == "Q?"  # no passages: exactly the baseline prompt


def test_max_passage_chars_cuts_at_a_word():
    t = PromptTemplate(max_passage_chars=20)
    # "Aalto, Alvar Aalto: Finnish..." -> first 20 chars "Aalto, Alvar Aalto: " -> cut at the last space
    assert t.block([P1]) == "Aalto, Alvar Aalto:\n\n"


def test_chat_template_wraps_passages_and_prompt(tiny_lm):
    tok = tiny_lm.tokenizer
    assert PromptTemplate(chat="auto").uses_chat(tok) is False  # the char tokenizer has no chat template
    with pytest.raises(ValueError, match="no chat template"):
        PromptTemplate(chat="always").render(tok, "Q?", [])
    tok.chat_template = CHAT
    t = PromptTemplate(chat="auto", system="Be brief.", header="C: ", footer=" | ")
    assert t.render(tok, "Q?", [P1]) == \
        "<|system|>Be brief.\n<|user|>C: Aalto, Alvar Aalto: Finnish architect (1898-1976) | Q?\n<|assistant|>"
    assert PromptTemplate(chat="never").render(tok, "Q?", [P1]) == \
        "Aalto, Alvar Aalto: Finnish architect (1898-1976)\n\nQ?"


def test_template_fields_are_checked():
    with pytest.raises(ValueError, match="unknown field"):
        PromptTemplate(passage="{body}")
    with pytest.raises(ValueError, match="chat must be one of"):
        PromptTemplate(chat="yes")
    with pytest.raises(ValueError, match="known fields"):
        PromptTemplate.from_config({"heading": "x"})
    with pytest.raises(ValueError, match="known fields"):
        ContextControl(template={"heading": "x"})


def test_control_overrides_the_task_template_field_by_field():
    base = PromptTemplate(chat="auto", header="Context:\n", footer="\n\n")
    c = ContextControl(template={"header": "Evidence: "}, max_passages=1)
    t = c.template(base)
    assert (t.chat, t.header, t.footer) == ("auto", "Evidence: ", "\n\n")
    assert c.select([P1, P2]) == [P1]


def test_engine_uses_the_control_template_and_max_passages(tiny_lm):
    trace: list = []
    st = Strategy("c", datastore=FakeChunks(DOCS), control=ContextControl(template={"header": "E: "}, max_passages=1),
                  schedule=EveryN(100))
    eng = Engine(tiny_lm, st, template=PromptTemplate(footer=" | "), k=3, max_new_tokens=2, trace=trace)
    eng.generate([Request("hello world")])
    want = "E: hello there world | hello world"  # one passage (max_passages=1), control header, task footer
    ids = tiny_lm.tokenizer(want, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(tiny_lm.model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
    assert torch.allclose(trace[0]["logprobs"][0], ref, atol=1e-5)


def test_reprefill_mid_generation_equals_fresh_forward(tiny_lm):
    """Rows fire at step 4 with new passages: the next logits equal a fresh pass over the new full prompt."""
    trace: list = []
    ds = FakeChunks(DOCS)
    st = Strategy("c", datastore=ds, control=ContextControl(), schedule=EveryN(4))
    eng = Engine(tiny_lm, st, k=1, query="last_tokens", query_tokens=3, max_new_tokens=6, stop_at_eos=False,
                 trace=trace)
    prompts = ["to be or not", "the cat sat on"]
    eng.generate(prompts)
    rec = trace[4]
    assert bool(rec["fire"].all())
    for b, p in enumerate(prompts):
        text = eng.template.render(tiny_lm.tokenizer, p, rec["passages"][b])
        ids = tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"] + rec["gen"][b]
        with torch.no_grad():
            ref = torch.log_softmax(tiny_lm.model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
        assert torch.allclose(rec["logprobs"][b], ref, atol=1e-4)
    # the step-4 query was the last 3 tokens of prompt + generation
    assert ds.queries[2] == tiny_lm.tokenizer.decode(
        (tiny_lm.tokenizer(prompts[0], add_special_tokens=False)["input_ids"] + rec["gen"][0])[-3:])


def test_context_cell_refuses_a_token_datastore():
    cfg = OmegaConf.create({"strategy": {"name": "x", "control": {"_target_": "rcd.control.context.ContextControl"}},
                            "datastore": {"unit": "tokens"}})
    with pytest.raises(StrategyError, match=r"accepts \['chunks', 'latent'\]"):
        validate(cfg)
