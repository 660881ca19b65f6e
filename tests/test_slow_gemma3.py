"""Slow: the second embedded model family, Gemma-3-270M (sliding-window + global attention, two RoPE bases),
runs every preset: generation and perplexity, on small datastores built from the Shakespeare corpus."""
from __future__ import annotations

import pytest

PRESETS = ["none", "once", "every_n", "per_sentence", "adaptive", "per_token", "replug", "tags", "verify",
           "latent_kv", "knn_attention"]
SMALL = {"tokens": ["datastore.max_tokens=2000"],
         "chunks": ["datastore.retriever=bm25", "datastore.max_chunks=300"],
         "tags": ["datastore.retriever=bm25", "datastore.max_chunks=300"],
         "latent": ["datastore.retriever=bm25", "datastore.max_chunks=40"]}


@pytest.fixture(scope="module")
def gemma3():
    from rcd.models import load_model

    return load_model("gemma3", "cpu", "float32")


@pytest.mark.slow
def test_gemma3_is_the_embedded_alias(gemma3):
    assert type(gemma3.model).__name__ == "Gemma3ForCausalLM"
    assert (gemma3.hidden_size, gemma3.vocab_size, len(gemma3.model.model.layers)) == (640, 262144, 18)
    assert gemma3.fingerprint.startswith("gguf:")


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_on_gemma3(gemma3, preset, tmp_path_factory):
    from hydra.utils import instantiate

    from test_run import cfg_for

    from rcd import strategy as strategy_mod
    from rcd.tasks import lm as lm_task

    root = tmp_path_factory.getbasetemp() / "gemma3-ds"
    cfg = cfg_for([f"+strategy={preset}", "model.name=gemma3", "progress=false"])
    unit = cfg.get("datastore", {}).get("unit") if cfg.get("datastore") else None
    if unit:
        cfg = cfg_for([f"+strategy={preset}", "model.name=gemma3", "progress=false"] + SMALL[unit])
    corpus = instantiate(cfg.corpus.datastore) if unit else None
    strat = strategy_mod.build(cfg, gemma3, corpus, corpus_name=cfg.corpus.name, datastore_root=root)
    doc = lm_task.heldout_docs(gemma3, instantiate(cfg.corpus.heldout), 96)[0]
    if strat.engine is None:
        from rcd.engine import Engine

        strat.engine = Engine(gemma3, None)
    res = strat.engine.score(doc["ids"], window=256, stride=128)
    nll = res.nll if res.nll is not None else res.nll_none
    assert nll.shape == (95,) and bool((nll >= 0).all()) and float(nll.mean()) < 20
    out = strat.engine.generate(["To be, or not to be"], max_new_tokens=3)
    assert 1 <= len(out.token_ids[0]) <= 3
    if unit and preset != "per_sentence":  # every other schedule fires at step 0
        assert out.cost["retrievals"] >= 1
        assert res.fired >= 1 or preset == "verify"  # verify scores a fixed text as the plain model
