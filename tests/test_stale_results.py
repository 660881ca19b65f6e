"""Results cannot go stale: outside code a ``_target_`` names is part of the run identity, and a finished
result of other rcd code is refused on reuse (force=true recomputes, reuse=any accepts it, saying so)."""
import json
import shutil
from pathlib import Path

import pytest

from conftest import tiny_run_files
from rcd.errors import RcdError
from rcd.identity import code_version, computed_by_this_code, outside_modules, source_fingerprint
from rcd.run import config_hash, execute, reuse_results
from test_run import cfg_for

OUTSIDE = Path(__file__).parent / "fixtures" / "outside"


def _outside_copy(tmp_path, monkeypatch):
    mod = tmp_path / "mods"
    mod.mkdir()
    shutil.copy(OUTSIDE / "chunk_boost.py", mod / "stale_probe_boost.py")  # a name no other test imports
    monkeypatch.syspath_prepend(str(mod))
    return mod / "stale_probe_boost.py"


def test_outside_module_source_is_in_the_run_identity(tmp_path, monkeypatch):
    src = _outside_copy(tmp_path, monkeypatch)
    from omegaconf import OmegaConf

    cfg = cfg_for(["+strategy=once"])
    OmegaConf.set_struct(cfg, False)
    cfg.strategy.control = {"_target_": "stale_probe_boost.ChunkBoost", "beta": 2.0}
    found = outside_modules(OmegaConf.to_container(cfg, resolve=True))
    assert [(k, m, p.resolve()) for k, m, p in found] == [("code.stale_probe_boost", "stale_probe_boost",
                                                              src.resolve())]
    before = config_hash(cfg)
    assert config_hash(cfg) == before  # stable
    src.write_text(src.read_text().replace("self.beta = float(beta)", "self.beta = 2 * float(beta)"))
    assert config_hash(cfg) != before  # an edit to the outside control: a new run, not the old results
    # rcd's own targets are recorded (run.code), not hashed
    plain = cfg_for(["+strategy=once"])
    assert outside_modules(OmegaConf.to_container(plain, resolve=True)) == []


def test_results_of_other_rcd_code_are_refused_then_recomputed_or_accepted(tmp_path, capsys):
    files = tiny_run_files(tmp_path)
    cfg = cfg_for(["+strategy=per_token", "strategy.control.k=8", "task.generate=false",
                   f"runs_root={tmp_path / 'runs'}"] + files["lm"])
    res = execute(cfg)
    assert res["run"]["code"]["source"] == source_fingerprint() and computed_by_this_code(res)
    folder = Path(res["run"]["folder"])
    assert execute(cfg) == res  # this code's results: reused
    done = folder / "results.json"
    old = dict(res, run=dict(res["run"], code={"rcd": "0.1.0", "source": "0123456789abcdef", "commit": "a" * 40,
                                               "dirty": True}))
    done.write_text(json.dumps(old))
    with pytest.raises(RcdError, match=r"other rcd code \(commit aaaaaaaaaa with uncommitted edits, source "
                                       r"0123456789abcdef; this is .*force=true.*reuse=any"):
        execute(cfg)
    cfg.reuse = "any"
    got = execute(cfg)
    assert got["run"]["reused_other_code"] is True and got["metrics"] == res["metrics"]
    assert "accepted by reuse=any" in capsys.readouterr().out
    cfg.reuse, cfg.force = "same_code", True
    again = execute(cfg)
    assert computed_by_this_code(again) and again["metrics"]["perplexity"] == res["metrics"]["perplexity"]
    # a result written before rcd recorded its source is other code too
    done.write_text(json.dumps(dict(res, run=dict(res["run"], code={"rcd": "0.1.0", "commit": None}))))
    with pytest.raises(RcdError, match="unknown source"):
        reuse_results(folder)


def test_reuse_is_validated_at_start_up():
    from rcd.errors import ConfigError
    from rcd.validate import check_config

    with pytest.raises(ConfigError, match=r"reuse: must be one of \['same_code', 'any'\]"):
        check_config(cfg_for(["+strategy=none", "reuse=never"]))


def test_source_fingerprint_covers_computing_code_only():
    assert code_version()["source"] == source_fingerprint() and len(source_fingerprint()) == 16
