"""``python -m rcd.run +strategy=<preset>``: run one point of the grid on one task.

Writes ``<runs>/<strategy>-<task>-<hash>/`` with ``config.yaml`` (resolved), ``results.json``
and ``provenance.jsonl``; the hash is of the resolved config, so the same config reuses its
folder, and a folder that already holds results is skipped unless ``force=true``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from rcd.errors import EXIT_CODE, RcdError
from rcd.paths import conf_dir, datastore_root, runs_dir

log = logging.getLogger("rcd.run")

#: keys that do not change what a run computes
_NOT_HASHED = ("force", "reuse", "progress", "runs_root", "datastore_root", "threads")


def config_hash(cfg, identity: Optional[tuple] = None) -> str:
    """Hash of what a run computes: :func:`rcd.identity.run_identity` of the config (file values by
    content, model weights by content) without :data:`_NOT_HASHED`."""
    from rcd.identity import run_identity

    hashed, _ = identity if identity is not None else run_identity(cfg)
    hashed = {k: v for k, v in hashed.items() if k not in _NOT_HASHED}
    return hashlib.sha1(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_folder(cfg: DictConfig, identity: Optional[tuple] = None) -> Path:
    root = Path(cfg.runs_root) if cfg.get("runs_root") else runs_dir()
    from rcd.labels import cell_label, folder_slug

    return root / f"{folder_slug(cell_label(cfg))}-{cfg.task.name}-{config_hash(cfg, identity)}"


def finite_json(obj: Any, path: str = "", bad: Optional[list] = None) -> Any:
    """``obj`` with every NaN / ±inf float replaced by None (their keys appended to ``bad``), so
    results.json is always valid JSON (``json.dumps(..., allow_nan=False)`` holds)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if bad is not None:
            bad.append(f"{path}={obj}")
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v, f"{path}.{k}" if path else str(k), bad) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v, f"{path}[{i}]", bad) for i, v in enumerate(obj)]
    return obj


def check_writable(folder: Path, what: str, fix: str) -> None:
    """Refuse a folder rcd must write to but cannot, before any model or datastore loads."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".rcd-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RcdError(f"{what} {folder} is not writable ({e.strerror}): {fix}") from None


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows[1:]])


def execute(cfg: DictConfig) -> dict:
    """Run ``cfg`` (already composed) and return its results dict.

    Order: start-up validation (no model, no datastore) → run identity by content (a finished run
    with the same identity is returned as is) → corpora and the leak check → the model and its
    context checks → datastore and strategy → the task → results.json (atomic, valid JSON).
    """
    from rcd.identity import run_identity
    from rcd.validate import check_config

    check_config(cfg)  # every check that needs no model and no datastore
    identity = run_identity(cfg)
    inputs = identity[1]
    folder = run_folder(cfg, identity)
    done = folder / "results.json"
    if done.exists() and not cfg.force:
        return reuse_results(folder, str(cfg.get("reuse", "same_code")))
    check_writable(folder.parent, "the runs folder", "set runs_root=<a writable folder> (or RCD_RUNS)")
    folder.mkdir(parents=True, exist_ok=True)
    from rcd.datastore.base import file_lock

    # the run folder is claimed: an identical run started meanwhile waits, then reads these results
    with file_lock(folder / ".claim", f"computing the same run ({folder.name}) to finish"):
        if done.exists() and not cfg.force:
            return reuse_results(folder, str(cfg.get("reuse", "same_code")), "computed by another process")
        return _compute(cfg, folder, inputs)


#: ``reuse=``: which finished results a run returns instead of computing
REUSE = ("same_code", "any")


def reuse_results(folder: Path, reuse: str = "same_code", how: str = "") -> dict:
    """The results in ``folder`` if the rcd code that computed them is this code (:func:`rcd.identity.
    code_version`'s ``source``); results of other rcd code are refused, naming both (``reuse=any`` returns
    them, saying so). The run's identity already covers config, data, weights and outside code."""
    from rcd.identity import code_version, computed_by_this_code, describe_code

    res = json.loads((folder / "results.json").read_text())
    then, now = (res.get("run") or {}).get("code"), code_version()
    same = computed_by_this_code(res)
    if not same and reuse != "any":
        raise RcdError(f"{folder}: holds results computed by other rcd code ({describe_code(then)}; this is "
                       f"{describe_code(now)}): rerun with force=true to recompute them, or reuse=any to accept them")
    note = "" if same else f"; computed by other rcd code ({describe_code(then)}), accepted by reuse=any"
    print(f"[rcd] {folder} already holds results ({how + ', ' if how else ''}force=true to rerun{note})")
    if not same:
        res.setdefault("run", {})["reused_other_code"] = True
    return res


def _compute(cfg: DictConfig, folder: Path, inputs: dict) -> dict:
    from rcd import strategy as strategy_mod
    from rcd.identity import code_version
    from rcd.leakage import check_disjoint
    from rcd.models import load_model
    from rcd.validate import check_with_model

    import torch

    done = folder / "results.json"
    _write_atomic(folder / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(cfg.seed)
    t0, c0 = time.perf_counter(), time.process_time()
    check_heldout = bool(cfg.task.get("check_heldout", True))  # false for tasks with their own data (QA)
    heldout = instantiate(cfg.corpus.heldout) if check_heldout else None
    corpus_ds = None
    leak = None
    if cfg.get("datastore"):
        corpus_ds = instantiate(cfg.corpus.datastore)
        if check_heldout:
            lc = cfg.get("leak_check") or {}
            leak = check_disjoint(corpus_ds, heldout, ngram=int(lc.get("ngram", 13)),
                                  max_overlap=float(lc.get("max_overlap", 0.01)))
    t_data = time.perf_counter() - t0
    t0m = time.perf_counter()
    lm = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    t_model = time.perf_counter() - t0m
    check_with_model(cfg, lm)
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
        "run": {"folder": str(folder), "hash": folder.name.rsplit("-", 1)[-1], "strategy": strat.name,
                "model": lm.name, "model_fingerprint": lm.fingerprint, "device": str(lm.device),
                "argv": sys.argv[1:], "code": code_version()},
        "inputs": inputs,
        "leak_check": leak,
        "datastore": ds_info,
        "timing": {"data_load_s": t_data, "model_load_s": t_model, "datastore_s": t_store,
                   "total_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                   "threads": torch.get_num_threads()},
    })
    bad: list[str] = []
    res = finite_json(res, bad=bad)
    if bad:
        res["non_finite"] = bad  # e.g. an infinite perplexity: recorded as null, named here
        print(f"[rcd] warning: non-finite values written as null: {', '.join(bad[:5])}", file=sys.stderr)
    _write_atomic(folder / "provenance.jsonl", "".join(json.dumps(finite_json(r)) + "\n" for r in provenance))
    _write_atomic(done, json.dumps(res, indent=2, default=str, allow_nan=False))
    summary = getattr(sys.modules[task_fn.__module__], "summary_rows", None)
    if summary is not None:
        print(format_table(summary(strat.name, res, ds_info["size"] if ds_info else None)))
    print(f"[rcd] results: {done}")
    return res


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def report_error(e: BaseException, prefix: str = "[rcd] error:") -> None:
    """Print a refusal in the one form users see (``[rcd] error: <message>``)."""
    from hydra.errors import InstantiationException

    if isinstance(e, InstantiationException):
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        msg = str(cause) if cause is not e else str(e)
    elif isinstance(e, OSError) and e.filename:
        msg = f"{e.filename}: {e.strerror or e}"
    else:
        msg = str(e)
    print(f"{prefix} {msg}", file=sys.stderr)


def set_threads(n: Optional[int]) -> None:
    """``threads=N``: torch (intra-op) and FAISS (OpenMP) threads of this run; null keeps their defaults.
    The knob for launchers whose jobs share a machine (``hydra/launcher=rcd_processes``: N jobs x 1 thread)."""
    if n is None:
        return
    n = int(n)
    if n < 1:
        raise RcdError(f"threads={n}: must be >= 1 (or null for torch's default)")
    import torch

    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)  # for processes this run starts


#: libraries whose INFO lines every run would print without telling the user anything (FAISS's loader
#: says which SIMD build it tried: "Could not load library with AVX512 support ...")
_QUIET = ("faiss.loader", "faiss")


def setup_logging() -> None:
    """INFO for rcd, WARNING for the libraries in :data:`_QUIET` (rcd.run and rcd.build)."""
    logging.basicConfig(level=logging.INFO)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> Optional[dict]:
    from hydra.errors import InstantiationException

    setup_logging()
    try:
        set_threads(cfg.get("threads"))
        res = execute(cfg)
    except (RcdError, ValueError, RuntimeError, OSError, InstantiationException) as e:
        report_error(e)
        if _in_multirun():  # the launcher records the job as failed and the sweep goes on
            raise RcdError(str(e)) from e
        sys.exit(EXIT_CODE)
    if _in_multirun():  # what a launcher hands back to the sweeper (pickled across processes)
        from rcd.compare import record_job

        if res.get("run", {}).get("folder"):
            record_job(res["run"]["folder"])  # the sweep's comparison (rcd.compare.CompareCallback) lists it
        return {"folder": res.get("run", {}).get("folder"), "hash": res.get("run", {}).get("hash")}
    return None


def _plain_strategy_alias(argv: list[str]) -> list[str]:
    """Accept ``strategy=x`` as well as Hydra's ``+strategy=x``."""
    return ["+" + a if a.startswith("strategy=") else a for a in argv]


def cli() -> None:
    """``rcd-run`` (console script) = ``python -m rcd.run``."""
    from rcd.preflight import check_argv

    sys.argv = [sys.argv[0]] + _plain_strategy_alias(sys.argv[1:])
    check_argv(sys.argv[1:])  # Hydra's composition errors in rcd's form (exit 2)
    main()


if __name__ == "__main__":
    cli()
