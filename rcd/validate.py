"""Start-up validation: every check that needs neither the model nor a datastore, run first.

:func:`check_config` is the first thing ``rcd.run`` and ``rcd.build`` do. It refuses, as a
:class:`rcd.errors.ConfigError` naming the dotted key (or an error naming the file and row):

* the strategy's axes (:func:`rcd.strategy.validate`: control × datastore unit);
* every control and schedule parameter, by building the control and schedule from config (their
  constructors check ranges; an unknown key is refused with the accepted ones);
* every datastore parameter (:data:`DATASTORE_RULES`; unknown keys against the unit's
  ``build_or_load`` Params);
* the task's parameters and data (the task module's ``validate(cfg)``: e.g. every row of a QA file);
* the corpus files (:func:`rcd.corpus.check_node`: present, UTF-8, valid JSON lines, non-empty,
  with the text column in every row) and the leak-check settings.

Checks that need the model's configuration (context length vs window and prompts) run in
:func:`check_with_model`, right after the model loads and before any datastore is built.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import math
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from rcd.errors import ConfigError


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive_int(key: str, v, *, allow_none: bool = False, minimum: int = 1) -> None:
    if v is None and allow_none:
        return
    if not _int(v) or v < minimum:
        more = " or null" if allow_none else ""
        raise ConfigError(key, f"must be an integer >= {minimum}{more}, got {v!r}")


def number(key: str, v, *, low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
           high_open: bool = False, allow_none: bool = False, why: str = "") -> None:
    if v is None and allow_none:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        rng = f" in {lo}, {hi}" if lo and hi else (f" {'>' if low_open else '>='} {low}" if lo else f" <= {high}")
        raise ConfigError(key, f"must be a finite number{rng}{' or null' if allow_none else ''}, got {v!r}{why}")


def boolean(key: str, v) -> None:
    if not isinstance(v, bool):
        raise ConfigError(key, f"must be true or false, got {v!r}")


def one_of(key: str, v, choices) -> None:
    if v not in choices:
        raise ConfigError(key, f"must be one of {list(choices)}, got {v!r}")


# ---------------------------------------------------------------- datastore
def _index_factory(key: str, v) -> None:
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(key, f"must be a FAISS factory string such as Flat, HNSW32, IVF1024,PQ64; got {v!r}")


#: datastore key -> check(key, value); applied to whichever keys a unit's config has
DATASTORE_RULES: dict[str, Callable[[str, Any], None]] = {
    "max_tokens": lambda k, v: positive_int(k, v, allow_none=True),
    "window": lambda k, v: positive_int(k, v, minimum=2),
    "stride": lambda k, v: positive_int(k, v, allow_none=True),
    "batch_size": positive_int,
    "encoder_batch_size": positive_int,
    "key_dtype": lambda k, v: one_of(k, v, ("float16", "float32")),
    "kv_dtype": lambda k, v: one_of(k, v, ("float16", "float32")),
    "memory_dtype": lambda k, v: one_of(k, v, ("float16", "float32")),
    "index_factory": _index_factory,
    "memory_index_factory": _index_factory,
    "metric": lambda k, v: one_of(k, v, ("l2", "ip")),
    "memory_metric": lambda k, v: one_of(k, v, ("l2", "ip")),
    "nprobe": positive_int,
    "ef_search": positive_int,
    "rrf_k": positive_int,
    "candidates": positive_int,
    "max_chunks": lambda k, v: positive_int(k, v, allow_none=True),
    "max_tags": lambda k, v: positive_int(k, v, allow_none=True),
    "chunk_size": positive_int,
    "overlap": lambda k, v: positive_int(k, v, minimum=0),
    "temperature": lambda k, v: number(k, v, low=0, low_open=True, allow_none=True),
    "retriever": lambda k, v: one_of(k, v, ("dense", "bm25", "hybrid")),
    "chunking": lambda k, v: one_of(k, v, ("tokens", "sentence", "record")),
    "weighting": lambda k, v: one_of(k, v, ("softmax", "score", "uniform")),
    "shard": lambda k, v: positive_int(k, v, allow_none=True, minimum=0),
    "num_shards": lambda k, v: positive_int(k, v, allow_none=True),
    "index_ondisk": lambda k, v: boolean(k, v),
}


def check_datastore(node: Optional[DictConfig], prefix: str = "datastore") -> None:
    if node is None or not node.get("_target_"):
        return
    params = OmegaConf.to_container(node, resolve=True)
    target = params.pop("_target_")
    try:
        fn = _resolve(target)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{prefix}._target_", f"{target!r} cannot be imported ({e})") from None
    from rcd.datastore.unit import Unit

    owner = getattr(fn, "__self__", None)
    if isinstance(owner, Unit):  # a unit's build_or_load: its Params are the config keys
        known = owner.config_keys()
    else:
        sig = inspect.signature(fn)
        known = {n for n, p in sig.parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    known |= {"unit", "shard", "num_shards"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}", f"is not a parameter of {target} (a typo?); its parameters: "
                          f"{sorted(known - {'lm', 'corpus_ds', 'corpus_name', 'root', 'progress'})}")
    for key, value in params.items():
        rule = DATASTORE_RULES.get(key)
        if rule is not None:
            rule(f"{prefix}.{key}", value)
    if params.get("stride") is not None and params.get("window") is not None and params["stride"] > params["window"]:
        raise ConfigError(f"{prefix}.stride", f"must be <= window={params['window']}, got {params['stride']}")
    if params.get("overlap") is not None and params.get("chunk_size") and params["overlap"] >= params["chunk_size"]:
        raise ConfigError(f"{prefix}.overlap", f"must be < chunk_size={params['chunk_size']}, got {params['overlap']}")
    if params.get("index_ondisk"):
        import re

        fac = str(params.get("index_factory", ""))
        if not re.search(r"(^|,)IVF\d+", fac) or "+" in fac or "Refine" in fac:
            raise ConfigError(f"{prefix}.index_ondisk", f"needs an IVF index_factory without a refine stage (e.g. "
                              f"IVF4096,SQfp16), got {fac!r}; rerank=true re-scores hits from the stored keys")
        if params.get("use_gpu") is True:
            raise ConfigError(f"{prefix}.index_ondisk", "an on-disk index is searched on the CPU: set use_gpu=null or "
                              "false (or index_ondisk=false to copy the index to the GPU)")
    if params.get("shard") is not None and params.get("num_shards") is not None \
            and params["shard"] >= params["num_shards"]:
        raise ConfigError(f"{prefix}.shard", f"must be < num_shards={params['num_shards']}, got {params['shard']}")


def _resolve(target: str):
    mod, _, name = target.rpartition(".")
    return getattr(importlib.import_module(mod), name)


# ---------------------------------------------------------------- strategy axes
def _build_axis(node: DictConfig, key: str):
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except Exception as e:  # constructors check their parameters; Hydra wraps what they raise
        cause = e
        while getattr(cause, "__cause__", None) is not None:
            cause = cause.__cause__
        raise ConfigError(key, str(cause)) from None


def check_strategy(cfg: DictConfig) -> None:
    from rcd import strategy as strategy_mod

    strategy_mod.validate(cfg)
    built = {}
    for axis in ("control", "schedule"):
        node = OmegaConf.select(cfg, f"strategy.{axis}")
        if isinstance(node, DictConfig) and node.get("_target_"):
            built[axis] = _build_axis(node, f"strategy.{axis}")
    check_engine(cfg, built.get("control"), built.get("schedule"))
    retrieval = OmegaConf.select(cfg, "strategy.retrieval")
    if isinstance(retrieval, DictConfig):
        for key in ("k", "query_tokens", "min_query_tokens"):
            if key in retrieval:
                positive_int(f"strategy.retrieval.{key}", retrieval[key])


def check_engine(cfg: DictConfig, control=None, schedule=None) -> None:
    """``engine=hf|vllm``: its keys, that vLLM imports, and that vLLM can run this cell (its control and
    schedule, the datastore's key layer, the task) — before any model or datastore loads."""
    node = OmegaConf.select(cfg, "engine")
    name = "hf" if node is None else node.get("name", "hf")
    one_of("engine.name", name, ("hf", "vllm"))
    if name != "vllm":
        return
    from types import SimpleNamespace

    from rcd.engine.core import EngineError
    from rcd.engine.vllm_engine import VllmSettings, refusal, vllm_available

    try:
        VllmSettings.from_config(OmegaConf.to_container(node, resolve=True))
    except (EngineError, TypeError, ValueError) as e:
        raise ConfigError("engine", str(e)) from None
    why = vllm_available()
    if why:
        raise ConfigError("engine", f"engine=vllm: {why}")
    task = str(OmegaConf.select(cfg, "task.name") or "")
    if task == "lm_knn_grid":
        raise ConfigError("engine", "task=lm_knn_grid scores its grid of (k, λ) on the HF model's hidden states; "
                                    "run it with engine=hf")
    if control is not None:
        layer = OmegaConf.select(cfg, "datastore.layer")
        if layer is not None and getattr(control, "datastore", None) is None:  # the key layer the build will use
            control.datastore = SimpleNamespace(manifest={"layer": str(layer)})
        why = refusal(control, schedule, task)
        if why:
            raise ConfigError("engine", f"engine=vllm cannot run strategy {OmegaConf.select(cfg, 'strategy.name')!r}: "
                                        f"{why}; run it with engine=hf")


# ---------------------------------------------------------------- tasks (helpers for their validate())
def check_long_prompt(cfg: DictConfig) -> None:
    from rcd.engine import LONG_PROMPT

    one_of("task.long_prompt", OmegaConf.select(cfg, "task.long_prompt", default="drop_passages"), LONG_PROMPT)


def check_generation_fits(cfg: DictConfig, lm) -> None:
    """``task.max_new_tokens`` leaves room for a prompt in the model's context."""
    ctx = lm.context_length
    new = OmegaConf.select(cfg, "task.max_new_tokens")
    if ctx is not None and new is not None and int(new) >= ctx:
        raise ConfigError("task.max_new_tokens", f"{new} new tokens leave no room for a prompt in the context of "
                          f"{lm.name!r} ({ctx} positions); choose fewer than {ctx}")


# ---------------------------------------------------------------- everything
def check_targets(cfg: DictConfig) -> None:
    """Every ``_target_`` of the config (but Hydra's own) imports; else a :class:`ConfigError` naming the key,
    the module and the fix (its folder on PYTHONPATH, or the right name)."""
    from hydra.utils import get_object

    from rcd.identity import _targets, module_file

    for key, target in _targets({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items()
                                 if k != "hydra"}):
        quiet = logging.getLogger("hydra.utils")  # it logs the failure itself; the ConfigError below says it
        level, quiet.disabled = quiet.disabled, True
        try:
            get_object(target)
        except Exception as e:  # ImportError, AttributeError, or an error the module raised on import
            cause = e.__cause__ or e
            module, _ = module_file(target)
            if module is None:
                top = target.split(".")[0]
                raise ConfigError(key, f"cannot import {target!r}: no module {top!r} on the path "
                                  f"({type(cause).__name__}). Put the folder holding {top}.py (or the package "
                                  f"{top}/) on PYTHONPATH, e.g. PYTHONPATH=<folder> rcd-run ..., or correct "
                                  "the name") from None
            attr = target[len(module) + 1:]
            raise ConfigError(key, f"cannot load {target!r}: module {module!r} was found, but {attr!r} could not be "
                              f"loaded from it ({type(cause).__name__}: {str(cause).splitlines()[0][:300]}); check "
                              f"the name defined in {module}") from None
        finally:
            quiet.disabled = level


def check_config(cfg: DictConfig, *, task: bool = True) -> None:
    """All start-up checks (module doc); raises an :class:`RcdError` naming the key, file or row."""
    from rcd.corpus import check_node

    check_targets(cfg)
    if task:
        reuse = OmegaConf.select(cfg, "reuse", default="same_code")
        one_of("reuse", reuse, ("same_code", "any"))
        check_strategy(cfg)
    check_datastore(OmegaConf.select(cfg, "datastore"))
    leak = OmegaConf.select(cfg, "leak_check")
    if leak is not None:
        positive_int("leak_check.ngram", leak.get("ngram"))
        number("leak_check.max_overlap", leak.get("max_overlap"), low=0, high=1)
    uses_heldout = task and bool(OmegaConf.select(cfg, "task.check_heldout", default=True))
    if OmegaConf.select(cfg, "datastore") is not None:
        check_node(cfg.corpus.datastore, "corpus.datastore")
    if uses_heldout and OmegaConf.select(cfg, "corpus.heldout") is not None:
        check_node(cfg.corpus.heldout, "corpus.heldout")
    if task:
        target = OmegaConf.select(cfg, "task._target_")
        if not target:
            raise ConfigError("task", "no task chosen: add task=<lm|qa|...>")
        mod = importlib.import_module(target.rpartition(".")[0])
        check = getattr(mod, "validate", None)
        if check is not None:
            check(cfg)


def check_with_model(cfg: DictConfig, lm) -> None:
    """Checks that need the model's config: the task's windows and prompts fit its context."""
    target = OmegaConf.select(cfg, "task._target_")
    if target:
        check = getattr(importlib.import_module(target.rpartition(".")[0]), "validate_with_model", None)
        if check is not None:
            check(cfg, lm)


