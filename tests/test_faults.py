"""Faults: a build and a run killed with SIGKILL leave nothing that looks finished, and the rerun
gives the numbers of an uninterrupted run. Real processes (``python -m rcd.run``) on a tiny model."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _setup(tmp_path: Path) -> list[str]:
    model, tok = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    words = "to be or not to be that is the question whether tis nobler in the mind".split()
    rows = [" ".join(words[(i * 7 + j) % len(words)] for j in range(400)) for i in range(60)]  # ~120k tokens
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    (tmp_path / "held.jsonl").write_text(json.dumps({"text": "Held out: a sea of troubles, and by opposing end them."}) + "\n")
    return [f"model.name={tmp_path / 'model'}", "corpus=files", f"corpus.datastore.data_files={tmp_path / 'corpus.jsonl'}",
            f"corpus.heldout.data_files={tmp_path / 'held.jsonl'}", "task.window=32", "task.stride=16",
            "task.max_new_tokens=4", "+strategy=per_token", "strategy.control.k=8", "datastore.max_tokens=null",
            "datastore.batch_size=1", "progress=false", f"datastore_root={tmp_path / 'ds'}"]


def _run(args, runs, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "rcd.run"] + args + [f"runs_root={runs}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _kill_when(args, runs, env, ready, timeout=240) -> bool:
    """Start a run, SIGKILL it as soon as ``ready()`` holds; False if it finished first."""
    p = subprocess.Popen([sys.executable, "-m", "rcd.run"] + args + [f"runs_root={runs}"], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    try:
        while p.poll() is None and time.time() - t0 < timeout:
            if ready():
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
                return True
            time.sleep(0.02)
        return False
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _results(runs: Path) -> dict:
    (res,) = list(runs.glob("*/results.json"))
    return json.loads(res.read_text())


def test_killed_build_and_killed_run_rerun_to_the_same_numbers(tmp_path):
    args = _setup(tmp_path)
    env = {**os.environ, "RCD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    ds = tmp_path / "ds"

    # 1. kill while the datastore is being built (its .building-* folder exists)
    killed = _kill_when(args, tmp_path / "runs-a", env, lambda: any(ds.glob(".building-*/keys.npy")))
    assert killed, "the build finished before it could be killed"
    assert not [p for p in ds.glob("tokens-*") if (p / "manifest.json").exists()]  # nothing looks finished
    assert not list((tmp_path / "runs-a").glob("*/results.json"))
    p = _run(args, tmp_path / "runs-a", env)  # the rerun cleans the dead build's folder and builds anew
    assert p.returncode == 0, p.stderr[-3000:]
    assert not list(ds.glob(".building-*"))
    first = _results(tmp_path / "runs-a")

    # 2. kill a run after its datastore exists, while it scores (config.yaml written, no results yet)
    runs_b = tmp_path / "runs-b"
    longer = args + ["task.eval_tokens=null", "task.generate=true"]
    _kill_when(longer, runs_b, env, lambda: any(runs_b.glob("*/config.yaml")))
    assert not list(runs_b.glob("*/results.json"))  # a killed run never leaves results behind
    p = _run(longer, runs_b, env)
    assert p.returncode == 0, p.stderr[-3000:]
    again = _results(runs_b)
    p = _run(longer, tmp_path / "runs-c", env)  # uninterrupted reference
    assert p.returncode == 0, p.stderr[-3000:]
    ref = _results(tmp_path / "runs-c")
    assert again["metrics"]["perplexity"] == ref["metrics"]["perplexity"]
    assert again["datastore"]["folder"] == first["datastore"]["folder"]


def test_parallel_runs_build_a_datastore_once_and_an_identical_run_once(tmp_path):
    args = _setup(tmp_path) + ["datastore.max_tokens=20000", "datastore.batch_size=8"]
    env = {**os.environ, "RCD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    runs = tmp_path / "runs"
    variants = [[], [], ["strategy.control.k=16"]]  # two identical runs and one that shares their datastore
    procs = [subprocess.Popen([sys.executable, "-m", "rcd.run"] + args + v + [f"runs_root={runs}"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in variants]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-2000:] for o in outs]
    stdout = "".join(o[0] for o in outs)
    assert "[rcd] waiting for another process" in stdout
    assert stdout.count("already holds results") == 1  # the identical run was computed once
    built = [p for p in (tmp_path / "ds").glob("tokens-*") if (p / "manifest.json").exists()]
    assert len(built) == 1 and not list((tmp_path / "ds").glob(".building-*"))  # built once
    results = [json.loads(p.read_text()) for p in runs.glob("*/results.json")]
    assert len(results) == 2 and {r["datastore"]["folder"] for r in results} == {str(built[0])}
    assert not list(runs.glob("*/*.tmp-*"))
