"""Slow: the real embedded model and corpus through the real CLI (python -m rcd.run)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args, env):
    return subprocess.run([sys.executable, "-m", "rcd.run"] + args, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_per_token_on_a_shakespeare_slice(tmp_path):
    env = dict(os.environ, RCD_RUNS=str(tmp_path / "runs"))  # model cache shared with the user's cache
    env.pop("RCD_CACHE", None)
    args = ["+strategy=per_token", "datastore.max_tokens=4000", "task.eval_tokens=400", "task.max_new_tokens=8",
            f"datastore_root={tmp_path / 'ds'}", "progress=false"]
    out = run_cli(args, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "per_token" in out.stdout and "none" in out.stdout
    res = json.loads(next((tmp_path / "runs").glob("per_token-lm-*/results.json")).read_text())
    p = res["metrics"]["perplexity"]
    assert p["tokens"] == 399
    assert 5 < p["perplexity_none"] < 100  # SmolLM2-135M on Macbeth
    assert p["perplexity"] < p["perplexity_none"]  # kNN-LM helps even with a small datastore
    assert res["datastore"]["size"] == 4000
    assert res["metrics"]["generation"]["per_token"]["new_tokens"] == 16  # 2 prompts x 8


@pytest.mark.slow
def test_unknown_strategy_lists_presets(tmp_path):
    out = run_cli(["+strategy=nope"], dict(os.environ, RCD_RUNS=str(tmp_path)))
    assert out.returncode != 0
    assert "per_token" in out.stderr and "none" in out.stderr
