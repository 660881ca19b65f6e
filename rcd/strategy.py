"""A strategy = what (datastore) × how (control) × when (schedule), assembled from config.

``conf/strategy/<preset>.yaml`` names a point on the grid: it picks a control
(``strategy/control=...``), a schedule (``strategy/schedule=...``) and a datastore
(top-level ``datastore=...``, shared with ``rcd.build``). Every piece is a Hydra ``_target_``,
so a new cell costs one class and one YAML file. :func:`validate` runs before anything heavy
and refuses a cell that cannot work, naming the valid choices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.utils import get_class, get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import LogitsProcessor

from rcd.errors import RcdError


class StrategyError(RcdError):
    pass


@dataclass
class Strategy:
    name: str
    datastore: Any = None
    control: Any = None
    schedule: Any = None
    #: ``strategy.retrieval`` of the config (k, query, query_tokens, tag_format) for rcd.engine
    retrieval: dict = field(default_factory=dict)
    #: the rcd.engine.Engine that runs this strategy (generation, QA, scoring); None for the plain model
    engine: Any = None

    @property
    def is_baseline(self) -> bool:
        return self.control is None

    def processor(self) -> Optional[LogitsProcessor]:
        """The LogitsProcessor for ``model.generate`` (:func:`rcd.engine.processor_for`; None: plain)."""
        return None if self.engine is None else self.engine.processor()


def call_target(node: DictConfig, **runtime):
    """Call ``node._target_`` with the node's plain values plus runtime objects (models, datasets).

    ``hydra.utils.instantiate`` would turn runtime dataclasses into configs, so they go in here.
    """
    params = OmegaConf.to_container(node, resolve=True)
    target = get_method(params.pop("_target_"))
    return target(**params, **runtime)


def _section(cfg: DictConfig, key: str):
    node = OmegaConf.select(cfg, key)
    return None if node is None or (isinstance(node, DictConfig) and not node) else node


def validate(cfg: DictConfig) -> None:
    """Check that the strategy's axes fit together before loading anything."""
    strat = _section(cfg, "strategy")
    if strat is None:
        raise StrategyError("no strategy chosen: add +strategy=<preset> (see conf/strategy/; e.g. none, per_token)")
    control = _section(cfg, "strategy.control")
    ds = _section(cfg, "datastore")
    if control is None:
        return
    if ds is None:
        raise StrategyError(f"strategy {strat.get('name')!r} has a control but no datastore: add datastore=<unit>")
    cls = get_class(control["_target_"])
    from rcd.control.base import ControlError, check_protocol

    try:
        check_protocol(cls)
    except ControlError as e:
        raise StrategyError(f"strategy.control._target_={control['_target_']}: {e}") from None
    accepts = tuple(getattr(cls, "accepts_units", ()))
    unit = ds.get("unit")
    if accepts and unit not in accepts:
        raise StrategyError(
            f"control {cls.__name__} cannot use a {unit!r} datastore; it accepts {list(accepts)}. "
            f"Choose datastore={accepts[0]} or another control.")
    check = getattr(cls, "check_datastore_config", None)  # e.g. inject needs a latent store built with KV caches
    if check is not None:
        try:
            check(ds)
        except ValueError as e:
            raise StrategyError(str(e)) from None


def build(cfg: DictConfig, lm, corpus_ds=None, corpus_name: str = "corpus", datastore_root=None) -> Strategy:
    """Instantiate datastore, control and schedule of ``cfg.strategy`` for model ``lm``."""
    validate(cfg)
    from rcd.labels import cell_label

    name = cell_label(cfg)  # the preset's name, or the composition when an axis was overridden
    control_cfg = _section(cfg, "strategy.control")
    if control_cfg is None:
        strat = Strategy(name=name)
        if OmegaConf.select(cfg, "engine.name") not in (None, "hf"):  # the plain model on another engine
            from rcd.engine import from_config
            strat.engine = from_config(lm, None, cfg, task=str(OmegaConf.select(cfg, "task.name") or "generate"))
        return strat
    ds_cfg = cfg.datastore
    from rcd.datastore.base import build_lock
    from rcd.paths import cache_dir

    root = datastore_root if datastore_root is not None else cache_dir("datastores")
    with build_lock(root, str(ds_cfg.get("unit")), corpus_name):  # parallel runs build a datastore once
        datastore = call_target(ds_cfg, lm=lm, corpus_ds=corpus_ds, corpus_name=corpus_name, root=root,
                                progress=bool(cfg.get("progress", True)))
    control = instantiate(control_cfg)
    schedule_cfg = _section(cfg, "strategy.schedule")
    schedule = instantiate(schedule_cfg) if schedule_cfg is not None else None
    if schedule is not None and hasattr(schedule, "bind_tokenizer"):
        schedule.bind_tokenizer(lm.tokenizer)
    if hasattr(control, "bind"):
        control.bind(datastore=datastore)
    retrieval = _section(cfg, "strategy.retrieval")
    strat = Strategy(name=name, datastore=datastore, control=control, schedule=schedule,
                     retrieval=OmegaConf.to_container(retrieval, resolve=True) if retrieval is not None else {})
    from rcd.engine import from_config

    strat.engine = from_config(lm, strat, cfg, task=str(OmegaConf.select(cfg, "task.name") or "generate"))
    return strat
