"""``python -m rcd.run +strategy=<preset>``: run one point of the grid on one task.

Writes ``<runs>/<strategy>-<task>-<hash>/`` with ``config.yaml`` (resolved), ``results.json``
and ``provenance.jsonl``; the hash is of the resolved config, so the same config reuses its
folder, and a folder that already holds results is skipped unless ``force=true``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import hydra
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from rcd.paths import datastore_root, runs_dir

log = logging.getLogger("rcd.run")

#: keys that do not change what a run computes
_NOT_HASHED = ("force", "progress", "runs_root", "datastore_root")


def config_hash(cfg: DictConfig) -> str:
    d = OmegaConf.to_container(cfg, resolve=True)
    for k in _NOT_HASHED:
        d.pop(k, None)
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_folder(cfg: DictConfig) -> Path:
    root = Path(cfg.runs_root) if cfg.get("runs_root") else runs_dir()
    return root / f"{cfg.strategy.name}-{cfg.task.name}-{config_hash(cfg)}"


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows[1:]])


def execute(cfg: DictConfig) -> dict:
    """Run ``cfg`` (already composed) and return its results dict."""
    from rcd import strategy as strategy_mod
    from rcd.corpus import check_disjoint
    from rcd.models import load_model

    import torch

    strategy_mod.validate(cfg)  # fail before any heavy work
    folder = run_folder(cfg)
    done = folder / "results.json"
    if done.exists() and not cfg.force:
        print(f"[rcd] {folder} already holds results (force=true to rerun)")
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    lm = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    t_model = time.perf_counter() - t0
    check_heldout = bool(cfg.task.get("check_heldout", True))  # false for tasks with their own data (QA)
    heldout = instantiate(cfg.corpus.heldout) if check_heldout else None
    corpus_ds = None
    if cfg.get("datastore"):
        corpus_ds = instantiate(cfg.corpus.datastore)
        if check_heldout:
            check_disjoint(corpus_ds, heldout)
    root = datastore_root(cfg)
    t1 = time.perf_counter()
    strat = strategy_mod.build(cfg, lm, corpus_ds, corpus_name=cfg.corpus.name, datastore_root=root)
    t_store = time.perf_counter() - t1
    provenance: list[dict] = []
    if getattr(strat, "engine", None) is not None:
        strat.engine.provenance = provenance  # retrievals of the engine (scoring, generation) go to provenance.jsonl
    task_fn = get_method(cfg.task._target_)
    res = task_fn(cfg, lm, strat, heldout, provenance)
    ds_info = strat.datastore.describe() if strat.datastore is not None else None
    res.update({
        "run": {"folder": str(folder), "hash": config_hash(cfg), "strategy": strat.name, "model": lm.name,
                "device": str(lm.device), "argv": sys.argv[1:]},
        "datastore": ds_info,
        "timing": {"model_load_s": t_model, "datastore_s": t_store, "total_s": time.perf_counter() - t0},
    })
    with open(folder / "provenance.jsonl", "w") as f:
        for rec in provenance:
            f.write(json.dumps(rec) + "\n")
    tmp = folder / "results.json.tmp"
    tmp.write_text(json.dumps(res, indent=2, default=str))
    tmp.replace(done)
    summary = getattr(sys.modules[task_fn.__module__], "summary_rows", None)
    if summary is not None:
        print(format_table(summary(strat.name, res, ds_info["size"] if ds_info else None)))
    print(f"[rcd] results: {done}")
    return res


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO)
    try:
        execute(cfg)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"[rcd] error: {e}", file=sys.stderr)
        sys.exit(2)


def _plain_strategy_alias(argv: list[str]) -> list[str]:
    """Accept ``strategy=x`` as well as Hydra's ``+strategy=x``."""
    return ["+" + a if a.startswith("strategy=") else a for a in argv]


if __name__ == "__main__":
    sys.argv = [sys.argv[0]] + _plain_strategy_alias(sys.argv[1:])
    main()
