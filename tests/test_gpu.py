"""GPU checks (``-m gpu``; ``make gpu-check`` runs them on a CUDA machine): the engine, kNN-LM search and
mixing, KV injection and perplexity scoring in bfloat16 on the device against float32 references on the
CPU, and FAISS on the GPU against FAISS on the CPU. Skipped where no CUDA device is visible;
``RCD_TEST_DEVICE=cpu`` runs them in bfloat16 on the CPU (to check the checks themselves)."""
from __future__ import annotations

import copy
import os

import datasets
import numpy as np
import pytest
import torch

from conftest import TEXTS, as_loaded, tiny_llama

DEVICE = os.environ.get("RCD_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE is None, reason="no CUDA device (RCD_TEST_DEVICE=cpu to force)")]
PROMPTS = ["To be, or not to be", "The slings and arrows"]


@pytest.fixture(scope="module")
def pair():
    """(float32 on the CPU, bfloat16 on DEVICE): one tiny model with the same weights."""
    model, tok = tiny_llama(hidden=64, layers=2)
    ref = as_loaded(model, tok, name="tiny-fp32")
    dev = as_loaded(copy.deepcopy(model).to(device=DEVICE, dtype=torch.bfloat16), tok, name="tiny-bf16")
    return ref, dev


def _step_logprobs(lm, strategy=None, **kw):
    from rcd.engine import Engine

    trace: list = []
    out = Engine(lm, strategy, max_new_tokens=6, stop_at_eos=False, trace=trace, **kw).generate(PROMPTS)
    return out, trace


def test_engine_decodes_in_bfloat16_like_float32(pair):
    ref, dev = pair
    assert dev.device.type == torch.device(DEVICE).type and dev.dtype == "bfloat16"
    _, t32 = _step_logprobs(ref)
    out, t16 = _step_logprobs(dev)
    assert out.cost["tokens"] == 12
    first32, first16 = t32[0]["logprobs"], t16[0]["logprobs"]  # the prefill's distribution (same prompt)
    assert (first16.exp() - first32.exp()).abs().sum(-1).max() < 0.05  # total variation x2 under 5%
    # greedy tokens agree wherever float32's top-2 margin is clear of bfloat16 rounding
    top2 = first32.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1
    assert torch.equal(first16.argmax(-1)[clear], first32.argmax(-1)[clear])


def test_perplexity_in_bfloat16_is_within_one_percent(pair):
    from rcd.tasks.perplexity import score

    ref, dev = pair
    text = " ".join(TEXTS)
    ids = ref.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    p32 = score(ref, ids, window=64, stride=32).summary()["perplexity_none"]
    p16 = score(dev, ids, window=64, stride=32).summary()["perplexity_none"]
    assert abs(p16 / p32 - 1) < 0.01


def test_knn_lm_on_the_device_matches_float32(pair, tmp_path):
    from rcd.control.knn import KNNInterpolation
    from rcd.datastore.index import gpu_available
    from rcd.datastore.tokens import build_or_load
    from rcd.tasks.perplexity import score

    ref, dev = pair
    corpus = datasets.Dataset.from_dict({"id": [f"r{i}" for i in range(6)], "text": TEXTS[:2] * 3})
    kw = dict(max_tokens=None, window=64, stride=64, progress=False, key_dtype="float32")
    s32 = build_or_load(ref, corpus, "toy", tmp_path / "fp32", use_gpu=False, **kw)
    on_gpu = DEVICE.startswith("cuda") and gpu_available()
    s16 = build_or_load(dev, corpus, "toy", tmp_path / "bf16", use_gpu=on_gpu, **kw)
    assert len(s16) == len(s32)
    keys32 = torch.from_numpy(np.asarray(s32.keys, dtype=np.float32))
    keys16 = torch.from_numpy(np.asarray(s16.keys, dtype=np.float32))
    assert ((keys16 - keys32).norm(dim=-1) / keys32.norm(dim=-1)).max() < 0.05  # bf16 hidden states as keys
    # FAISS on the GPU (when faiss-gpu is installed) returns the CPU's neighbours on the same keys
    q = keys16[::7].to(dev.device)
    cpu = build_or_load(dev, corpus, "toy", tmp_path / "bf16", use_gpu=False, **kw)
    a, b = s16.search(q, 8), cpu.search(q, 8)
    assert torch.equal(a.ids.cpu(), b.ids.cpu()) and torch.allclose(a.scores.cpu(), b.scores.cpu(), rtol=1e-3, atol=1e-3)
    text = TEXTS[2]
    ids = ref.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    r32 = score(ref, ids, KNNInterpolation(k=8, lmbda=0.25, datastore=s32), window=64, stride=32).summary()
    r16 = score(dev, ids, KNNInterpolation(k=8, lmbda=0.25, datastore=s16), window=64, stride=32).summary()
    assert abs(r16["perplexity"] / r32["perplexity"] - 1) < 0.02
    assert r16["perplexity"] != r16["perplexity_none"]  # the datastore changed the bfloat16 numbers too


def test_kv_injection_in_bfloat16_matches_the_text_path(pair, tmp_path):
    from rcd.control.inject import KVInjection
    from rcd.datastore.latent import build_or_load
    from rcd.engine import Engine, Request
    from rcd.schedule import Once
    from rcd.strategy import Strategy

    _, dev = pair
    corpus = datasets.Dataset.from_dict({"id": [f"t{i}" for i in range(3)], "text": TEXTS})
    latent = build_or_load(dev, corpus, "toy", tmp_path, kv_dtype="float32", chunking="tokens", chunk_size=24,
                           overlap=0, retriever="bm25", progress=False, batch_size=4)
    trace, prov = [], []
    st = Strategy("kv", datastore=latent, control=KVInjection(positions="shift"), schedule=Once())
    Engine(dev, st, k=1, max_new_tokens=4, stop_at_eos=False, trace=trace, provenance=prov).generate([Request("To be, or not")])
    chunk = prov[0]["ids"][0]
    ids = latent.tokens(chunk).tolist() + dev.tokenizer("To be, or not", add_special_tokens=False)["input_ids"]
    for rec in trace:
        with torch.no_grad():
            want = torch.log_softmax(dev.model(input_ids=torch.tensor([ids + rec["gen"][0]], device=dev.device))
                                     .logits[0, -1].float(), -1).cpu()
        assert (rec["logprobs"][0].exp() - want.exp()).abs().sum() < 0.05
