"""Experiment specs → runs: expansion into points, Hydra composition, run folders.

An experiment spec (``experiments/<name>.yaml``) lists override sets for ``python -m rcd.run``;
each entry (a table row or a figure series) may sweep parameters, and every value may be given
per scale (``{small: ..., full: ...}``)::

    title: "Table 1. ..."
    kind: table                 # table | figure
    layout: lm                  # tables: lm | qa | cost;  figures: knn_grid | pareto | size
    scales:                     # overrides for every entry, per scale
      small: [task.eval_tokens=2048]
      full: [task.eval_tokens=null]
    groups:                     # optional: every row is run once per group (e.g. per data set)
      - {key: wordnet, label: WordNet years, overrides: [...]}
    rows:                       # or ``series:`` for figures
      - key: every_n_4
        label: every_n (s=4)
        overrides: [+strategy=every_n, strategy.schedule.n=4]
        scales: {full: [datastore.max_tokens=null]}   # extra overrides at one scale
        sweep: {strategy.schedule.threshold: {small: [0.2, 0.4], full: [0.1, 0.2, 0.4]}}
        skip_scales: [small]                           # run at full scale only
        only_groups: [wordnet]                         # with groups: run in these groups only
        group_overrides: {wordnet: [corpus=wordnet_people]}  # extra overrides in one group

A point of an experiment is one fully expanded override list; it is composed with Hydra exactly as
``rcd.run`` composes it, and its run folder is ``rcd.run.run_folder`` of that config, so tables
read exactly the runs their spec names (stale folders of other configs are ignored). A point
whose preset does not exist yet, or whose cell is refused by ``rcd.strategy.validate``, is
reported and left out: the tables grow as presets land, and a missing value prints as "–".
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence




from rcd.paths import conf_dir

CONF = conf_dir()
SCALES = ("small", "full")
MISSING = "–"  # how a value that no run computed prints


@dataclass
class Run:
    """One finished run folder: ``results.json`` and the resolved ``config.yaml``."""

    folder: Path
    results: dict
    config: dict


def load_run(folder: Path | str) -> Optional[Run]:
    """The run in ``folder``, or None if it has no ``results.json`` (not run, or unfinished)."""
    folder = Path(folder)
    done = folder / "results.json"
    if not done.is_file():
        return None
    config: dict = {}
    if (folder / "config.yaml").is_file():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"), resolve=False)
    return Run(folder=folder, results=json.loads(done.read_text()), config=config)


def dig(d: Any, path: str, default: Any = None) -> Any:
    """``dig(d, "a.b.c")`` = d["a"]["b"]["c"], or ``default`` when any step is missing."""
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d or d[key] is None:
            return default
        d = d[key]
    return d


@dataclass
class Point:
    """One fully expanded run of an experiment."""

    experiment: str
    key: str  # row / series key
    label: str
    group: Optional[str]
    overrides: list[str]
    params: dict  # this point's sweep values
    entry_label: str = ""  # the row's / series' label without the sweep values


@dataclass
class Entry:
    """One row or series (with its sweep, unexpanded) of an experiment, for one group."""

    experiment: str
    key: str
    label: str
    group: Optional[str]
    overrides: list[str]  # scale overrides + group overrides + entry overrides
    sweep: dict  # key -> list of values

    def points(self) -> list[Point]:
        keys = list(self.sweep)
        out = []
        for combo in itertools.product(*(self.sweep[k] for k in keys)):
            params = dict(zip(keys, combo))
            ov = self.overrides + [f"{k}={override_value(v)}" for k, v in params.items()]
            label = self.label
            if params:
                label += " (" + ", ".join(f"{k.lstrip('+').rsplit('.', 1)[-1]}={override_value(v)}"
                                          for k, v in params.items()) + ")"
            out.append(Point(self.experiment, self.key, label, self.group, ov, params, self.label))
        return out

    def multirun_overrides(self) -> list[str]:
        """The override list for one ``--multirun`` call covering the whole sweep."""
        return self.overrides + [f"{k}={','.join(override_value(v) for v in vals)}" for k, vals in self.sweep.items()]


def override_value(v: Any) -> str:
    """A value as Hydra override syntax (null, true/false, [a,b], numbers, strings)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(override_value(x) for x in v) + "]"
    return str(v)


def at_scale(v: Any, scale: str) -> Any:
    """``{small: a, full: b}`` -> the value for ``scale``; anything else as is."""
    if isinstance(v, dict) and v and set(v) <= set(SCALES):
        return v.get(scale)
    return v


def load_spec(path: Path | str) -> dict:
    from omegaconf import OmegaConf

    path = Path(path)
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    spec.setdefault("name", path.stem)
    for req in ("title", "kind", "layout"):
        if req not in spec:
            raise ValueError(f"{path}: experiment spec needs {req!r}")
    if not spec.get("rows") and not spec.get("series") and not spec.get("from"):
        raise ValueError(f"{path}: experiment spec needs rows: (tables), series: (figures) or from: (cost)")
    return spec


def entries(spec: dict, scale: str) -> list[Entry]:
    """The spec's rows/series at ``scale``, crossed with its groups (if any), in spec order."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    common = list(at_scale(spec.get("scales", {}), scale) or [])
    groups = spec.get("groups") or [{"key": None, "label": None, "overrides": []}]
    out = []
    for g in groups:
        for e in spec.get("rows") or spec.get("series"):
            if scale in (e.get("skip_scales") or []):
                continue
            if e.get("only_groups") and g.get("key") not in e["only_groups"]:
                continue
            sweep = {k: list(at_scale(v, scale)) for k, v in (e.get("sweep") or {}).items()}
            ov = (common + list(at_scale(g.get("overrides") or [], scale)) + list(at_scale(e["overrides"], scale))
                  + list(at_scale(e.get("scales", {}), scale) or [])
                  + list(at_scale((e.get("group_overrides") or {}).get(g.get("key")) or [], scale)))
            out.append(Entry(spec["name"], e["key"], e.get("label", e["key"]), g.get("key"), ov, sweep))
    return out


def compose(overrides: Sequence[str]):
    """The config ``python -m rcd.run <overrides>`` would run (Hydra compose, no side effects)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides))


@dataclass
class Resolved:
    point: Point
    folder: Optional[Path]  # None when the point cannot be composed
    error: Optional[str] = None

    @property
    def done(self) -> bool:
        """Finished by this rcd code (a result of other rcd code is :attr:`stale` and runs again)."""
        return self.finished and not self.stale

    @property
    def finished(self) -> bool:
        return self.folder is not None and (self.folder / "results.json").is_file()

    @property
    def stale(self) -> bool:
        """Its results.json was computed by other rcd code (:func:`rcd.identity.computed_by_this_code`)."""
        from rcd.identity import computed_by_this_code

        return self.finished and not computed_by_this_code(json.loads((self.folder / "results.json").read_text()))


def resolve(point: Point, root: Path) -> Resolved:
    """Compose ``point`` and find its run folder under ``root``; a config error becomes ``error``."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rcd import strategy as strategy_mod
    from rcd.run import run_folder

    try:
        cfg = compose(point.overrides + [f"runs_root={root}"])
        strategy_mod.validate(cfg)
    except HydraException as e:  # includes MissingConfigException (preset not there yet)
        msg = str(e).splitlines()[0]
        m = re.search(r"Could not find '([^']+)'", msg)
        return Resolved(point, None, f"config not found: {m.group(1)}" if m else msg)
    except (OmegaConfBaseException, ValueError) as e:
        return Resolved(point, None, str(e).splitlines()[0])
    return Resolved(point, run_folder(cfg))


def experiment_root(runs_root: Path, spec: dict) -> Path:
    """``<runs_root>/<experiment name>``: the runs of one experiment."""
    return Path(runs_root) / spec["name"]


def collect(spec: dict, scale: str, root: Path) -> list[tuple[Resolved, Optional[Run]]]:
    """Every point of ``spec`` at ``scale`` with its finished run under ``root`` (the experiment's
    folder of runs), None if absent, unfinished or not composable."""
    out = []
    for e in entries(spec, scale):
        for p in e.points():
            r = resolve(p, root)
            out.append((r, load_run(r.folder) if r.folder is not None else None))
    return out


def grid_axes(config: dict) -> Optional[tuple[str, str, str]]:
    """(what, how, when) of a resolved config: datastore unit, control class, schedule class with what decides
    its firing (n; threshold, or target_rate when θ is calibrated; a sentence schedule's min_tokens when set),
    e.g. ``("tokens", "KNNInterpolation", "EveryN(n=4)")``; None for the plain model."""
    strat = config.get("strategy") or {}
    ctl = (strat.get("control") or {}).get("_target_")
    if not ctl:
        return None
    what = (config.get("datastore") or {}).get("unit") or MISSING
    sched = strat.get("schedule") or {}
    when = MISSING
    if sched.get("_target_"):
        when = sched["_target_"].rsplit(".", 1)[-1]
        calibrated = sched.get("target_rate") is not None  # θ is fitted to the rate: the rate says it
        args = [f"{k}={v}" for k, v in sched.items()
                if k == "n" or (k == "threshold" and not calibrated) or (k == "target_rate" and calibrated)
                or (k == "min_tokens" and v)]
        when += f"({', '.join(args)})" if args else ""
    return what, ctl.rsplit(".", 1)[-1], when


def grid_cell(config: dict) -> str:
    """``what · how · when`` of a run's config, e.g. ``tokens · KNNInterpolation · EveryN(n=4)``."""
    axes = grid_axes(config)
    return MISSING if axes is None else " · ".join(axes)
