"""Shared fixtures: tiny random causal LMs with a character-level tokenizer (no downloads)."""
from __future__ import annotations

import string

import pytest
import torch


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_letters + string.digits + string.punctuation + " \n")
    vocab = {"<unk>": 0, "<eos>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    return tok


def tiny_llama(hidden=32, layers=2, seed=0, vocab=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=1, pad_token_id=1,
                      bos_token_id=1)
    return LlamaForCausalLM(cfg).eval(), tok


def tiny_gemma3(hidden=32, seed=0, sliding_window=64):
    """A tiny random Gemma-3: one sliding-window and one global layer, each with its own RoPE base."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = char_tokenizer()
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           layer_types=["sliding_attention", "full_attention"], sliding_window=sliding_window,
                           max_position_embeddings=512, eos_token_id=1, pad_token_id=1, bos_token_id=1,
                           rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})
    return Gemma3ForCausalLM(cfg).eval(), tok


def as_loaded(model, tok, name="tiny"):
    from rcd.models import LoadedModel

    return LoadedModel(model=model, tokenizer=tok, name=name, source=f"{name}-test")


def tiny_run_files(tmp_path) -> dict:
    """A tiny model saved as a folder, a two-row corpus and a one-row held-out jsonl, with the rcd.run
    overrides that use them (``lm``: LM task, small windows; no runs_root)."""
    import json

    model, tok = tiny_llama()
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:2]))
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": TEXTS[2]}) + "\n")
    lm = [f"model.name={folder}", "corpus=files", f"corpus.datastore.data_files={corpus}",
          f"corpus.heldout.data_files={held}", "task.eval_tokens=60", "task.max_new_tokens=4",
          "task.window=32", "task.stride=16", f"datastore_root={tmp_path / 'ds'}", "progress=false"]
    return {"model": folder, "corpus": corpus, "held": held, "lm": lm}


@pytest.fixture
def tiny_lm():
    model, tok = tiny_llama()
    return as_loaded(model, tok)


@pytest.fixture
def other_lm():
    """Same tokenizer, another hidden size."""
    model, tok = tiny_llama(hidden=48, seed=1)
    return as_loaded(model, tok, name="tiny48")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RCD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RCD_RUNS", str(tmp_path / "runs"))


TEXTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n",
    "And by opposing end them. To die: to sleep;\nNo more; and by a sleep to say we end\n",
]
