"""engine.processor() inside model.generate, for chat prompts: the passages land inside the user turn, as in
Engine.generate, so both give the same tokens (before: outside the chat turn, another text)."""
import torch
from transformers import LogitsProcessorList

from rcd.control import ContextControl, PromptTemplate
from rcd.engine import Engine
from rcd.schedule import EveryN, Once
from rcd.strategy import Strategy
from test_engine import DOCS, FakeChunks

CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_unwrap_finds_the_user_message(tiny_lm):
    tok = tiny_lm.tokenizer
    tok.chat_template = CHAT
    t = PromptTemplate(chat="auto", header="Context:\n")
    text = t.render(tok, "to be or not")
    assert text == "<user>to be or not\n<assistant>" and t.unwrap(tok, text) == "to be or not"
    assert t.unwrap(tok, "to be or not") is None  # not a chat rendering: raw text
    assert PromptTemplate(chat="never").unwrap(tok, text) is None


def test_processor_in_generate_equals_engine_for_chat_prompts(tiny_lm):
    tok = tiny_lm.tokenizer
    tok.chat_template = CHAT
    prompts = ["hello world", "to be or not to be"]
    for sched in (Once, lambda: EveryN(3)):
        st = Strategy("c", datastore=FakeChunks(DOCS), control=ContextControl(), schedule=sched())
        trace: list = []
        eng = Engine(tiny_lm, st, template=PromptTemplate(chat="auto", header="Context:\n"), k=1,
                     max_new_tokens=6, stop_at_eos=False, trace=trace)
        want = eng.generate(prompts).token_ids
        eng.trace = None
        tok.padding_side = "left"
        texts = [eng.template.render(tok, p) for p in prompts]  # what a user feeds model.generate
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = tiny_lm.model.generate(**enc, logits_processor=LogitsProcessorList([eng.processor()]),
                                         max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                         pad_token_id=tok.pad_token_id, output_scores=True,
                                         return_dict_in_generate=True)
        assert out.sequences[:, enc["input_ids"].shape[1]:].tolist() == want
        for step, (rec, scores) in enumerate(zip(trace, out.scores)):  # the same distributions, step by step
            assert torch.allclose(scores.float(), rec["logprobs"].float(), atol=1e-4), step
