"""Sweeps through Hydra launchers: rcd's list sweeper (``hydra/sweeper=rcd_list``) hands the same four runs
to the basic launcher, local processes (joblib, 2 workers) and submitit's local executor; every computed
value (perplexities, per-token NLLs, samples, datastore size) is identical. A failed job is recorded and
the others still run. Real processes on a tiny model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_run_files
from rcd.paper.stats import computed_values

ROOT = Path(__file__).resolve().parents[1]
JOBS = [["+strategy=none"],
        ["+strategy=per_token", "strategy.control.k=8", "datastore.max_tokens=null"],
        ["+strategy=per_token", "strategy.control.k=4", "strategy.control.lmbda=0.5", "datastore.max_tokens=null"],
        ["+strategy=none", "task.eval_tokens=40"]]


def _sweep(tmp_path: Path, common: list[str], jobs: list[list[str]], launcher: list[str], name: str):
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    cmd = [sys.executable, "-m", "rcd.run", "--multirun", "hydra/sweeper=rcd_list",
           f"hydra.sweeper.jobs_file={tmp_path / f'{name}.jsonl'}", f"hydra.sweep.dir={tmp_path / 'sweeps' / name}",
           f"runs_root={tmp_path / 'runs' / name}", "threads=1"] + launcher + common
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    status = [json.loads(s) for s in (tmp_path / "sweeps" / name / "status.jsonl").read_text().splitlines()]
    runs = {f.parent.name: computed_values(json.loads(f.read_text()))
            for f in (tmp_path / "runs" / name).glob("*/results.json")}
    return p, status, runs


def test_three_launchers_compute_identical_numbers(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install rcd[cluster]")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install rcd[cluster]")
    common = tiny_run_files(tmp_path)["lm"]
    out = {}
    for name, launcher in (("basic", []), ("processes", ["hydra/launcher=rcd_processes", "hydra.launcher.n_jobs=2"]),
                           ("submitit", ["hydra/launcher=rcd_submitit_local", "hydra.sweeper.max_batch_size=2"])):
        p, status, runs = _sweep(tmp_path, common, JOBS, launcher, name)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        assert [s["status"] for s in status] == ["completed"] * 4 and [s["overrides"] for s in status] == JOBS
        assert len(runs) == 4
        out[name] = runs
    assert (tmp_path / "sweeps" / "submitit" / ".submitit").is_dir()  # submitit ran the jobs (its logs)
    assert out["basic"] == out["processes"] == out["submitit"]
    ppl = sorted(v["metrics.perplexity.perplexity"] for v in out["basic"].values() if "metrics.perplexity.perplexity" in v)
    assert len(ppl) == 2 and ppl[0] != ppl[1]  # the swept knob changed what was computed


def test_a_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    common = tiny_run_files(tmp_path)["lm"]
    jobs = [["+strategy=none"], ["+strategy=per_token", "strategy.control.k=0"], ["+strategy=none", "seed=3"]]
    p, status, runs = _sweep(tmp_path, common, jobs, [], "fail")
    assert p.returncode != 0
    assert [s["status"] for s in status] == ["completed", "failed", "completed"]
    assert "strategy.control: knn k=0 must be >= 1" in status[1]["error"]
    assert len(runs) == 2
    assert "[rcd] error: strategy.control: knn k=0" in p.stderr + p.stdout  # the one error form, also in a sweep


def test_list_sweeper_refuses_a_command_line_sweep_and_a_bad_jobs_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('["+strategy=none"]\n{"not": "a list"}\n')
    base = [sys.executable, "-m", "rcd.run", "--multirun", "hydra/sweeper=rcd_list", f"hydra.sweep.dir={tmp_path / 's'}"]
    p = subprocess.run(base + [f"hydra.sweeper.jobs_file={bad}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and f"{bad}:2: expected a JSON list of override strings" in p.stderr
    good = tmp_path / "good.jsonl"
    good.write_text('["+strategy=none"]\n')
    p = subprocess.run(base + [f"hydra.sweeper.jobs_file={good}", "seed=1,2"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0 and "write each combination as a line of the jobs file" in p.stderr
