"""rcd-compare: one table of finished runs against a baseline row, paired bootstrap CIs recomputed by hand,
rows named by the overrides that differ, the plot, and the table a --multirun prints at its end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_run_files
from rcd.compare import compare, find_runs
from rcd.errors import RcdError
from rcd.metrics import bootstrap_ci
from rcd.run import execute
from test_run import cfg_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmp")
    files = tiny_run_files(tmp)
    over = files["lm"] + [f"runs_root={tmp / 'runs'}", "task.max_new_tokens=3"]
    res = [execute(cfg_for(o + over)) for o in (["+strategy=none"], ["+strategy=per_token", "strategy.control.k=4"],
                                                 ["+strategy=per_token", "strategy.control.k=8"])]
    return tmp, files, over, res


def test_table_rows_labels_and_paired_ci_by_hand(lm_runs, tmp_path):
    tmp, _, _, res = lm_runs
    out = compare([r["run"]["folder"] for r in res], out=tmp_path, quiet=True)
    md = out["markdown"].splitlines()
    assert md[0] == "**Comparison: lm, 3 runs, baseline #1 (none)**"
    rows = [ln for ln in md if ln.startswith("| ") and not ln.startswith("| #")]
    assert [r.split("|")[2].strip() for r in rows] == ["none", "per_token (strategy.control.k=4)",
                                                        "per_token (strategy.control.k=8)"]
    assert rows[0].split("|")[4].strip() == "(baseline)"
    # Δ of row 2: exp(mean bootstrap of paired NLL differences) - 1, by hand
    a = np.array(res[1]["per_example"]["nll"])
    b = np.array(res[0]["per_example"]["nll_none"])
    m, lo, hi = bootstrap_ci(a - b, n_resamples=1000, seed=0)
    want = f"{np.expm1(m) * 100:+.1f}% [{np.expm1(lo) * 100:+.1f}, {np.expm1(hi) * 100:+.1f}]"
    assert rows[1].split("|")[4].strip() == want
    ppl = float(np.exp(a.mean()))
    assert rows[1].split("|")[3].strip().startswith(f"{ppl:.2f} [")
    assert "Rows differ in: " in out["markdown"] and "strategy.control.k" in out["markdown"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["compare.csv", "compare.md", "compare.pdf", "compare.png", "compare.tex"]
    csv = (tmp_path / "compare.csv").read_text().splitlines()
    assert csv[0].startswith("#,run,perplexity [95% CI]") and len(csv) == 4
    assert "\\begin{tabular}" in (tmp_path / "compare.tex").read_text()


def test_baseline_choice_and_refusals(lm_runs, tmp_path):
    _, _, _, res = lm_runs
    folders = [r["run"]["folder"] for r in res]
    out = compare(folders, out=tmp_path, baseline="strategy.control.k=4", quiet=True)
    assert "baseline #2 (per_token (strategy.control.k=4))" in out["markdown"]
    out = compare(folders, out=tmp_path, baseline="3", quiet=True)
    assert "baseline #3" in out["markdown"]
    with pytest.raises(RcdError, match="--baseline 9: there are 3 rows"):
        compare(folders, out=tmp_path, baseline="9", quiet=True)
    with pytest.raises(RcdError, match="no row has that label"):
        compare(folders, out=tmp_path, baseline="k=99", quiet=True)
    with pytest.raises(RcdError, match="holds no finished run"):
        compare([tmp_path / "empty"] if (tmp_path / "empty").mkdir() is None else [], quiet=True)
    # a runs/ root finds every run below it
    assert len(find_runs([Path(folders[0]).parent])) == 3


def test_unpaired_rows_and_other_code_are_said(lm_runs, tmp_path):
    tmp, files, over, res = lm_runs
    other = execute(cfg_for(["+strategy=per_token", "strategy.control.k=4"] + over + ["task.eval_tokens=40"]))
    folder = Path(other["run"]["folder"])
    r = json.loads((folder / "results.json").read_text())
    r["run"]["code"]["source"] = "0" * 16
    (folder / "results.json").write_text(json.dumps(r))
    out = compare([res[0]["run"]["folder"], folder], out=tmp_path, quiet=True)["markdown"]
    assert "Not paired with the baseline (other tokens or questions scored): rows 2." in out
    assert "Computed by other rcd code than this one: rows 2" in out


def test_multirun_prints_the_comparison_at_the_end_also_when_reused(lm_runs, tmp_path):
    _, _, over, _ = lm_runs
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "rcd.run", "--multirun", "+strategy=per_token", "strategy.control.k=4,16",
           f"hydra.sweep.dir={sweep}"] + over
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for _ in range(2):  # the second sweep reuses both runs (k=4 also reuses the fixture's run)
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "**Comparison: lm, 2 runs, baseline #1 (per_token (strategy.control.k=4))**" in p.stdout
        assert (sweep / "compare.md").is_file() and len((sweep / "runs.jsonl").read_text().splitlines()) == 2
    assert "already holds results" in p.stdout
