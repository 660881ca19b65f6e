"""A schedule from outside rcd (tests/fixtures/outside/clause_schedule.py + its YAML): bound to the model's
tokenizer through the public Schedule.bind_tokenizer, fires where it says, runs from the CLI next to an outside
control, and the census counts both with --config-dir."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_run_files
from rcd.control import ContextControl
from rcd.engine import Engine
from rcd.strategy import Strategy
from test_engine import DOCS, FakeChunks

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ROOT / "tests" / "fixtures" / "outside"


@pytest.fixture
def clause(monkeypatch):
    monkeypatch.syspath_prepend(str(OUTSIDE))
    from clause_schedule import ClauseEnd

    return ClauseEnd


def test_engine_binds_the_tokenizer_publicly_and_it_fires_at_clause_marks(tiny_lm, clause):
    sched = clause(marks=",;")
    assert sched.bound_tokenizer is None
    eng = Engine(tiny_lm, Strategy("c", datastore=FakeChunks(DOCS), control=ContextControl(), schedule=sched))
    assert sched.bound_tokenizer is tiny_lm.tokenizer and eng.schedule is sched
    again = sched.table
    sched.bind_tokenizer(tiny_lm.tokenizer)  # bound already: kept
    assert sched.table is again
    tok = tiny_lm.tokenizer
    ids = torch.tensor([tok("to be, or not; to be: yes", add_special_tokens=False)["input_ids"]])
    mask = sched.fire_mask(None, ids)[0].tolist()
    text = [tok.decode([i]) for i in ids[0].tolist()]
    want = [True] + [text[t] in (",", ";") for t in range(1, len(text))]  # step t reads the token of step t-1
    assert mask == want and sum(want) == 3
    sched.reset(1)
    steps = [bool(sched.should_fire(t, None, ids[:, t] if t else None)[0]) for t in range(ids.shape[1])]
    assert steps == mask


def test_outside_schedule_and_control_from_the_cli(tmp_path):
    files = tiny_run_files(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(OUTSIDE), str(ROOT)]))
    p = subprocess.run([sys.executable, "-m", "rcd.run", "--config-dir", str(OUTSIDE / "conf"), "+strategy=once",
                        "strategy/control=boost", "strategy/schedule=clause", f"runs_root={tmp_path / 'runs'}",
                        "strategy.retrieval.k=1", "++datastore.retriever=bm25"] + files["lm"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    [res] = [json.loads(f.read_text()) for f in (tmp_path / "runs").rglob("results.json")]
    assert res["run"]["strategy"] == "boost x clause" and "boost+clause-lm-" in res["run"]["folder"]
    assert res["metrics"]["schedule"]["schedule"] == "clause" and res["metrics"]["perplexity"]["retrieval_rate"] > 0
    assert {"code.chunk_boost", "code.clause_schedule"} <= set(res["inputs"])  # outside code is part of the identity


def test_census_counts_outside_controls_and_schedules(monkeypatch):
    monkeypatch.syspath_prepend(str(OUTSIDE))
    from rcd.census import cells, summary

    rows = cells(config_dir=OUTSIDE / "conf")
    s = summary(rows)
    assert s["outside_controls"] == ["boost"] and s["outside_schedules"] == ["clause"]
    assert s["cells"] == 4 * 13 * 6 and s["outside_cells"] == 4 * (13 + 6 - 1)
    by = {(r["unit"], r["control"], r["schedule"]): r for r in rows}
    assert by[("chunks", "boost", "clause")]["runs"] and by[("chunks", "boost", "clause")]["outside"] == ["control",
                                                                                                         "schedule"]
    assert not by[("tokens", "boost", "once")]["runs"]  # ChunkBoost accepts chunks only
    assert by[("tokens", "knn", "clause")]["runs"] and by[("tokens", "knn", "clause")]["outside"] == ["schedule"]
