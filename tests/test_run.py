"""rcd.run: config composition, start-up validation, run folders by config hash, end-to-end on a tiny model."""
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import TEXTS, tiny_run_files
from rcd import strategy as strategy_mod
from rcd.corpus import CorpusError
from rcd.run import config_hash, execute

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def cfg_for(overrides):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose(config_name="config", overrides=overrides)


def test_per_token_preset_composes_the_three_axes():
    cfg = cfg_for(["+strategy=per_token"])
    assert cfg.datastore.unit == "tokens"
    assert cfg.strategy.control._target_.endswith("KNNInterpolation")
    assert cfg.strategy.schedule._target_.endswith("EveryToken")
    cfg = cfg_for(["+strategy=per_token", "strategy/schedule=every_n", "strategy.schedule.n=4"])
    assert cfg.strategy.schedule.n == 4
    strategy_mod.validate(cfg)


def test_missing_strategy_and_missing_datastore_fail_at_start():
    with pytest.raises(strategy_mod.StrategyError, match=r"\+strategy=<preset>"):
        strategy_mod.validate(cfg_for([]))
    cfg = cfg_for(["+strategy=per_token"])
    OmegaConf.set_struct(cfg, False)
    cfg.datastore = None
    with pytest.raises(strategy_mod.StrategyError, match="no datastore"):
        strategy_mod.validate(cfg)
    cfg.datastore = {"unit": "chunks"}
    with pytest.raises(strategy_mod.StrategyError, match=r"accepts \['tokens'\]"):
        strategy_mod.validate(cfg)


def test_unknown_preset_lists_what_exists():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as e:
        cfg_for(["+strategy=nope"])
    assert "per_token" in str(e.value.options) or "per_token" in str(e.value)


def test_config_hash_is_stable_under_key_order():
    a = OmegaConf.create({"x": 1, "y": {"b": 2, "a": 3}, "force": False})
    b = OmegaConf.create({"y": {"a": 3, "b": 2}, "x": 1, "force": True})
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(OmegaConf.create({"x": 2, "y": {"b": 2, "a": 3}}))


def test_unknown_model_name_lists_embedded():
    from rcd.models import resolve_source

    with pytest.raises(ValueError, match="smollm2"):
        resolve_source("no-such-model")


@pytest.fixture
def tiny_setup(tmp_path):
    return tiny_run_files(tmp_path)["lm"] + [f"runs_root={tmp_path / 'runs'}"]


def test_end_to_end_tiny_run_and_skip_when_finished(tiny_setup, tmp_path):
    cfg = cfg_for(["+strategy=per_token", "strategy.control.k=8"] + tiny_setup)
    res = execute(cfg)
    p = res["metrics"]["perplexity"]
    assert p["tokens"] == 59 and p["perplexity"] > 0 and p["perplexity_none"] > 0
    assert res["datastore"]["size"] == sum(len(t) - 1 for t in TEXTS[:2])  # char tokenizer: 1 token per char
    folder = Path(res["run"]["folder"])
    assert folder.name.startswith("per_token-lm-")
    assert (folder / "config.yaml").exists() and (folder / "provenance.jsonl").exists()
    mtime = (folder / "results.json").stat().st_mtime_ns
    again = execute(cfg)  # finished: skipped, results read back
    assert again == json.loads((folder / "results.json").read_text())
    assert (folder / "results.json").stat().st_mtime_ns == mtime
    cfg.force = True
    execute(cfg)
    assert (folder / "results.json").stat().st_mtime_ns != mtime
    base = execute(cfg_for(["+strategy=none"] + tiny_setup))
    assert base["metrics"]["perplexity"]["perplexity_none"] == pytest.approx(p["perplexity_none"], rel=1e-6)


def test_heldout_overlapping_datastore_is_refused(tiny_setup, tmp_path):
    long_line = "This line is long enough to count as a line of the held-out text.\n"
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": long_line * 3}) + "\n")
    (tmp_path / "held.jsonl").write_text(json.dumps({"text": long_line}) + "\n")
    with pytest.raises(CorpusError, match="overlaps"):
        execute(cfg_for(["+strategy=per_token"] + tiny_setup))


def test_empty_corpus_file_is_refused(tiny_setup, tmp_path):
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(ValueError, match="empty"):
        execute(cfg_for(["+strategy=per_token"] + tiny_setup))
