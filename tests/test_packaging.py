"""The wheel: configs ship inside the package, so the CLI runs from any directory without the checkout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import TEXTS, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_runs_the_cli_outside_the_checkout_with_a_user_config_dir(tmp_path):
    wheels = tmp_path / "wheels"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(wheels)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    (wheel,) = wheels.glob("rcd-*.whl")
    site = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (site / "rcd" / "conf" / "config.yaml").is_file() and (site / "bin" / "rcd-run").is_file()
    assert (site / "rcd" / "conf" / "hydra" / "launcher" / "rcd_slurm.yaml").is_file()
    assert (site / "hydra_plugins" / "rcd_sweeper" / "list_sweeper.py").is_file()
    assert not (site / "hydra_plugins" / "__init__.py").exists()  # a namespace package, shared with other plugins

    model, tok = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "held.jsonl").write_text(json.dumps({"text": TEXTS[2]}) + "\n")
    user_conf = tmp_path / "my_conf" / "strategy"  # a user's own preset, from --config-dir
    user_conf.mkdir(parents=True)
    (user_conf / "my_baseline.yaml").write_text("name: my_baseline\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "RCD_CACHE": str(tmp_path / "cache")}
    args = ["--config-dir", str(tmp_path / "my_conf"), "+strategy=my_baseline", f"model.name={tmp_path / 'model'}",
            "corpus=files", f"corpus.heldout.data_files={tmp_path / 'held.jsonl'}", "corpus.datastore.data_files=x",
            "task.eval_tokens=40", "task.window=32", "task.stride=16", "task.generate=false", "runs_root=runs"]
    code = "import rcd, sys; from rcd.run import cli; assert rcd.__file__.startswith(sys.argv[1]), rcd.__file__; " \
           "sys.argv = ['rcd-run'] + sys.argv[2:]; cli()"
    p = subprocess.run([sys.executable, "-c", code, str(site)] + args, cwd=work, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    (res,) = (work / "runs").glob("my_baseline-lm-*/results.json")
    assert json.loads(res.read_text())["metrics"]["perplexity"]["tokens"] == 39
