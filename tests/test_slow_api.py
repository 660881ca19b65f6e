"""The Python API example (examples/api/knn_script.py) on the embedded SmolLM2: it finds the token datastore
`rcd.run` built (same folder, not rebuilt), and kNN-LM inside model.generate gives the Engine's text."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_api_script_reuses_the_datastore_rcd_run_built(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    ds, runs = tmp_path / "ds", tmp_path / "runs"
    p = subprocess.run([sys.executable, "-m", "rcd.run", "+strategy=per_token", "datastore.max_tokens=3000",
                        "task.eval_tokens=64", "task.generate=false", f"datastore_root={ds}", f"runs_root={runs}",
                        "progress=false"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    [res] = [json.loads(f.read_text()) for f in runs.rglob("results.json")]
    built = sorted(x.name for x in ds.iterdir())
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "api" / "knn_script.py"), "--max-tokens", "3000",
                        "--root", str(ds)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"datastore: {res['datastore']['folder']} (3,000 entries)" in p.stdout
    assert sorted(x.name for x in ds.iterdir()) == built  # nothing new was built
    assert "same text: True" in p.stdout and "built tokens datastore" not in p.stderr
