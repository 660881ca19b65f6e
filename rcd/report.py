"""Paper tables and figures from run folders: experiment specs, bootstrap CIs, Markdown/LaTeX, plots.

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

Uncertainty: perplexity's 95% interval is a percentile bootstrap over scored tokens of the mean
NLL, then exp (tokens of one text are not independent, so the interval is optimistic);
the change against the plain model is a paired bootstrap of the mean per-token NLL difference
(ppl'/ppl - 1 = exp(mean(NLL' - NLL)) - 1); exact match and F1 are bootstrapped over questions.
Speed numbers (tokens/s, time to first token) get no interval. All resampling uses
``rcd.metrics.bootstrap_ci`` with 1000 resamples and seed 0, so tables are reproducible.

:func:`lm_knn_grid` is a task (``task._target_=rcd.report.lm_knn_grid``) for Figure 1: one
forward pass and one k_max neighbour search give the perplexity at every (k, λ) of a grid.
"""
from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from rcd.metrics import bootstrap_ci

REPO = Path(__file__).resolve().parents[1]
CONF = Path(__file__).resolve().parent / "conf"
SCALES = ("small", "full")
MISSING = "–"
N_RESAMPLES = 1000
SEED = 0


# =========================================================================== run folders
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


# =========================================================================== statistics
@dataclass(frozen=True)
class Estimate:
    """A point estimate with an optional 95% interval."""

    value: float
    low: Optional[float] = None
    high: Optional[float] = None


def mean_ci(values: Sequence[float]) -> Estimate:
    """Mean with a percentile-bootstrap 95% interval (1000 resamples, seed 0)."""
    m, lo, hi = bootstrap_ci(values, n_resamples=N_RESAMPLES, seed=SEED)
    return Estimate(m, lo, hi)


def perplexity_ci(nll: Sequence[float]) -> Estimate:
    """exp of the mean per-token NLL, with exp of the bootstrap interval of that mean."""
    m, lo, hi = bootstrap_ci(nll, n_resamples=N_RESAMPLES, seed=SEED)
    return Estimate(math.exp(m), math.exp(lo), math.exp(hi))


def relative_change_ci(nll: Sequence[float], nll_base: Sequence[float]) -> Estimate:
    """ppl/ppl_base - 1 with a paired bootstrap interval over tokens (same tokens, same resamples)."""
    a, b = np.asarray(nll, dtype=np.float64), np.asarray(nll_base, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired NLL lists differ in length: {a.shape} vs {b.shape}")
    m, lo, hi = bootstrap_ci(a - b, n_resamples=N_RESAMPLES, seed=SEED)
    return Estimate(math.expm1(m), math.expm1(lo), math.expm1(hi))


# =========================================================================== formatting
def fmt_num(x: Optional[float], digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return MISSING
    return f"{x:,.{digits}f}"


def fmt_ci(e: Optional[Estimate], digits: int = 2, scale: float = 1.0, pct: bool = False) -> str:
    """``12.34 [11.90, 12.80]``; ``pct=True``: ``-12.3% [-13.0, -11.6]``."""
    if e is None:
        return MISSING
    f = (lambda v: f"{v * 100:+.{digits}f}") if pct else (lambda v: f"{v * scale:.{digits}f}")
    s = f(e.value) + ("%" if pct else "")
    if e.low is not None and e.high is not None:
        s += f" [{f(e.low)}, {f(e.high)}]"
    return s


def fmt_rate(x: Optional[float]) -> str:
    """A rate in [0, 1]: 3 decimals, or 2 significant digits below 0.01 (one retrieval in 2,047
    tokens is ``0.00049``, not ``0.000``)."""
    if x is None:
        return MISSING
    if 0 < x < 0.01:
        return f"{x:.2g}" if x >= 1e-4 else f"{x:.1e}"
    return f"{x:.3f}"


def fmt_int(x: Optional[float]) -> str:
    return MISSING if x is None else f"{int(x):,}"


@dataclass
class Table:
    """A titled table of strings, written as Markdown or as a LaTeX ``table``."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    label: str = ""

    def markdown(self) -> str:
        cells = [self.columns] + self.rows
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        out = [f"**{self.title}**", "", line(self.columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(r) for r in self.rows]
        for note in self.notes:
            out += ["", note]
        return "\n".join(out) + "\n"

    def latex(self) -> str:
        spec = "l" * len(self.columns)
        out = ["\\begin{table}[t]", "\\centering", "\\small", "\\resizebox{\\linewidth}{!}{%",
               f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
               " & ".join(latex_escape(c) for c in self.columns) + " \\\\", "\\midrule"]
        out += [" & ".join(latex_escape(c) for c in r) + " \\\\" for r in self.rows]
        out += ["\\bottomrule", "\\end{tabular}}"]
        title = self.title if self.title.endswith(".") else self.title + "."
        caption = " ".join(latex_escape(t) for t in [title] + list(self.notes))
        out.append(f"\\caption{{{caption}}}")
        if self.label:
            out.append(f"\\label{{tab:{self.label}}}")
        out.append("\\end{table}")
        return "\n".join(out) + "\n"


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--", "λ": r"$\lambda$",
          "θ": r"$\theta$", "×": r"$\times$", "÷": r"$\div$", "·": r"$\cdot$", "Δ": r"$\Delta$", "≤": r"$\leq$", "−": "-",
          "`": ""}


def latex_escape(s: str) -> str:
    s = re.sub(r"\*\*(.+?)\*\*", r"\1", s)  # Markdown bold in titles
    return "".join(_LATEX.get(ch, ch) for ch in s)


# =========================================================================== specs and points
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
        return self.folder is not None and (self.folder / "results.json").is_file()


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


# =========================================================================== metric extraction
def is_qa(res: dict) -> bool:
    return isinstance(dig(res, "metrics.qa"), dict)


def qa_metrics(res: dict) -> dict:
    return dig(res, "metrics.qa", {}) or {}


def _per_example(res: dict, *names: str) -> Optional[list]:
    pe = res.get("per_example") or {}
    for n in names:
        v = pe.get(n)
        if isinstance(v, list) and v and not isinstance(v[0], (dict, list)):
            return v
    return None


def _ci_or_point(values: Optional[list], point: Optional[float]) -> Optional[Estimate]:
    if values:
        return mean_ci([float(x) for x in values])
    return Estimate(float(point)) if point is not None else None


def exact_match(res: dict) -> Optional[Estimate]:
    return _ci_or_point(_per_example(res, "em", "exact_match"), qa_metrics(res).get("exact_match"))


def token_f1(res: dict) -> Optional[Estimate]:
    return _ci_or_point(_per_example(res, "f1", "token_f1"), qa_metrics(res).get("f1", qa_metrics(res).get("token_f1")))


def answer_in_output(res: dict) -> Optional[float]:
    """Answer containment of the QA task (``metrics.qa.contains``); None for runs made before it existed."""
    return qa_metrics(res).get("contains")


def lm_perplexity(res: dict) -> Optional[Estimate]:
    """Perplexity with the strategy (the plain model's for a baseline run)."""
    pe = res.get("per_example") or {}
    nll = pe.get("nll") or pe.get("nll_none")
    if nll:
        return perplexity_ci(nll)
    p = dig(res, "metrics.perplexity", {})
    v = p.get("perplexity", p.get("perplexity_none"))
    return Estimate(v) if v is not None else None


def lm_change(res: dict) -> Optional[Estimate]:
    pe = res.get("per_example") or {}
    if pe.get("nll") and pe.get("nll_none"):
        return relative_change_ci(pe["nll"], pe["nll_none"])
    v = dig(res, "metrics.perplexity.relative_change")
    return Estimate(v) if v is not None else None


def is_baseline(res: dict) -> bool:
    return dig(res, "run.strategy") == "none"


def retrieval_rate(res: dict) -> Optional[float]:
    if is_baseline(res):
        return 0.0
    if is_qa(res):
        return qa_metrics(res).get("retrieval_rate")
    return dig(res, "metrics.perplexity.retrieval_rate", dig(res, "metrics.schedule.retrieval_rate"))


def tokens_per_second(res: dict) -> Optional[float]:
    if is_qa(res):
        return qa_metrics(res).get("tokens_per_second")
    name = "none" if is_baseline(res) else dig(res, "run.strategy")
    return dig(res, f"metrics.generation.{name}.tokens_per_second")


def time_to_first_token(res: dict) -> Optional[float]:
    if is_qa(res):
        return qa_metrics(res).get("time_to_first_token")
    name = "none" if is_baseline(res) else dig(res, "run.strategy")
    return dig(res, f"metrics.generation.{name}.time_to_first_token")


def throughput_ratio(res: dict) -> Optional[float]:
    """Decode tokens/s with the strategy ÷ without, measured in the same process."""
    if is_baseline(res):
        return 1.0 if dig(res, "metrics.generation.none.tokens_per_second") else None
    return dig(res, "metrics.generation.throughput_ratio")


def datastore_build_seconds(res: dict) -> Optional[float]:
    """One-time build time of the run's datastore, from its ``manifest.json`` (None if not on this machine)."""
    folder = dig(res, "datastore.folder")
    if not folder or not (Path(folder) / "manifest.json").is_file():
        return None
    return json.loads((Path(folder) / "manifest.json").read_text()).get("build_seconds")


#: result keys measured in time, not computed from the data: they differ between two runs of one config
_TIMING_WORDS = ("second", "time", "ttft", "wall", "tokens_per_s", "throughput")


def computed_values(res: dict) -> dict[str, Any]:
    """Every value a run *computed* (metrics, samples, per-example scores, the datastore's size), flattened
    to ``"a.b[i]": value``, without what is measured in time (``*_s``, tokens/s, time to first token) or
    names the machine (folders, argv). Two runs of one config on any launcher must agree on all of it."""
    out: dict[str, Any] = {}

    def walk(x: Any, path: str) -> None:
        leaf = path.rsplit(".", 1)[-1].split("[", 1)[0]
        if leaf.endswith("_s") or leaf.endswith("_ms") or any(w in leaf for w in _TIMING_WORDS):
            return
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        else:
            out[path] = x

    for key in ("metrics", "samples", "per_example", "predictions", "leak_check"):
        if key in res:
            walk(res[key], key)
    if isinstance(res.get("datastore"), dict) and "size" in res["datastore"]:
        out["datastore.size"] = res["datastore"]["size"]
    return out


def quality(res: dict) -> Optional[Estimate]:
    """The task's headline quality: exact match (QA) or perplexity (lm)."""
    return exact_match(res) if is_qa(res) else lm_perplexity(res)


def grid_axes(config: dict) -> Optional[tuple[str, str, str]]:
    """(what, how, when) of a resolved config: datastore unit, control class, schedule class with its
    n / threshold, e.g. ``("tokens", "KNNInterpolation", "EveryN(n=4)")``; None for the plain model."""
    strat = config.get("strategy") or {}
    ctl = (strat.get("control") or {}).get("_target_")
    if not ctl:
        return None
    what = (config.get("datastore") or {}).get("unit") or MISSING
    sched = strat.get("schedule") or {}
    when = MISSING
    if sched.get("_target_"):
        when = sched["_target_"].rsplit(".", 1)[-1]
        args = [f"{k}={v}" for k, v in sched.items() if k in ("n", "threshold")]
        when += f"({', '.join(args)})" if args else ""
    return what, ctl.rsplit(".", 1)[-1], when


def grid_cell(config: dict) -> str:
    """``what · how · when`` of a run's config, e.g. ``tokens · KNNInterpolation · EveryN(n=4)``."""
    axes = grid_axes(config)
    return MISSING if axes is None else " · ".join(axes)


# =========================================================================== tables
@dataclass
class Row:
    """A table row's identity and its run (None if missing)."""

    key: str
    label: str
    group: Optional[str]
    run: Optional[Run]


def lm_table(title: str, rows: Sequence[Row], label: str = "") -> Table:
    """Table 1 layout: perplexity [CI], change vs plain [paired CI], bits/byte, retrieval rate, speed, TTFT."""
    cols = ["strategy", "what · how · when", "perplexity [95% CI]", "Δ vs none [95% CI]", "bits/byte",
            "retrieval rate", "decode tok/s", "time to 1st tok (s)", "tok/s ÷ none", "datastore entries"]
    out = []
    for r in rows:
        if r.run is None:
            out.append([r.label] + [MISSING] * (len(cols) - 1))
            continue
        res = r.run.results
        base = is_baseline(res)
        p = dig(res, "metrics.perplexity", {})
        out.append([
            r.label,
            grid_cell(r.run.config),
            fmt_ci(lm_perplexity(res)),
            MISSING if base else fmt_ci(lm_change(res), digits=1, pct=True),
            fmt_num(p.get("bits_per_byte_none") if base else p.get("bits_per_byte"), 4),
            fmt_rate(retrieval_rate(res)),
            fmt_num(tokens_per_second(res), 1),
            fmt_num(time_to_first_token(res), 3),
            fmt_num(throughput_ratio(res), 2),
            fmt_int(dig(res, "datastore.size")),
        ])
    notes = ["Perplexity: exp of the mean token NLL; interval = bootstrap over tokens (1000 resamples, seed 0). "
             "Δ: paired bootstrap of ppl/ppl_none − 1 on the same tokens. Speed: decode tokens/s and time to the "
             "first generated token at batch 1 (no interval; varies run to run), ÷ none measured in the same process. "
             "– = not run / not available."]
    return Table(title, cols, out, notes, label)


def qa_table(title: str, rows: Sequence[Row], groups: dict[str, str], label: str = "") -> Table:
    """Table 2 layout: one block of rows per data set: EM [CI], F1, answer in output, recall, retrieval rate,
    TTFT, tokens/s."""
    cols = ["data set", "strategy", "exact match [95% CI]", "F1", "answer in output", "recall", "retrieval rate",
            "time to 1st tok (s)", "decode tok/s"]
    out = []
    for r in rows:
        g = groups.get(r.group, r.group or MISSING)
        if r.run is None:
            out.append([g, r.label] + [MISSING] * (len(cols) - 2))
            continue
        res = r.run.results
        q = qa_metrics(res)
        f1 = token_f1(res)
        out.append([
            g, r.label,
            fmt_ci(exact_match(res), digits=3),
            fmt_num(f1.value if f1 else None, 3),
            fmt_num(answer_in_output(res), 3),
            fmt_num(q.get("recall"), 3),
            fmt_rate(retrieval_rate(res)),
            fmt_num(time_to_first_token(res), 3),
            fmt_num(tokens_per_second(res), 1),
        ])
    notes = ["Exact match (0–1) with a bootstrap interval over questions (1000 resamples, seed 0). "
             "Answer in output: share of questions whose first output line contains a reference answer as whole "
             "words after SQuAD normalisation (answer containment, as in DPR / PopQA). "
             "Speed columns have no interval and vary run to run. – = not run / not available."]
    return Table(title, cols, out, notes, label)


def cost_table(title: str, rows: Sequence[Row], label: str = "") -> Table:
    """Cost per strategy: decode speed, time to first token, datastore size on disk and build/load time."""
    cols = ["strategy", "decode tok/s", "tok/s ÷ none", "time to 1st tok (s)", "datastore entries",
            "datastore MB", "datastore build, once (s)", "datastore load in run (s)", "run total (s)"]
    out = []
    for r in rows:
        if r.run is None:
            out.append([r.label] + [MISSING] * (len(cols) - 1))
            continue
        res = r.run.results
        b = dig(res, "datastore.bytes")
        out.append([
            r.label,
            fmt_num(tokens_per_second(res), 1),
            fmt_num(throughput_ratio(res), 2),
            fmt_num(time_to_first_token(res), 3),
            fmt_int(dig(res, "datastore.size")),
            fmt_num(b / 2**20 if b is not None else None, 1),
            fmt_num(datastore_build_seconds(res), 1),
            fmt_num(dig(res, "timing.datastore_s") if res.get("datastore") else None, 1),
            fmt_num(dig(res, "timing.total_s"), 1),
        ])
    notes = ["Timings are wall-clock seconds on the machine that ran the row and vary run to run. "
             "Build, once: from the datastore's manifest (built by the first run that needed it, then cached); "
             "load in run: the run's own datastore time, which includes the build when it found none cached."]
    return Table(title, cols, out, notes, label)


def rows_of(collected: Sequence[tuple[Resolved, Optional[Run]]]) -> list[Row]:
    return [Row(r.point.key, r.point.label, r.point.group, run) for r, run in collected]



def build_table(spec: dict, rows: Sequence[Row]) -> Table:
    layout = spec["layout"]
    if layout == "lm":
        return lm_table(spec["title"], rows, spec["name"])
    if layout == "qa":
        groups = {g["key"]: g.get("label", g["key"]) for g in spec.get("groups") or []}
        return qa_table(spec["title"], rows, groups, spec["name"])
    if layout == "cost":
        return cost_table(spec["title"], rows, spec["name"])
    raise ValueError(f"{spec['name']}: unknown table layout {layout!r} (lm, qa, cost)")


def table_values(spec: dict, rows: Sequence[Row], table: Table) -> dict[str, str]:
    """``<experiment>.<row key>[.<group>].<column index name>`` -> cell, for the paper's prose."""
    out = {}
    keys = [re.sub(r"[^a-z0-9]+", "_", c.lower()).strip("_") for c in table.columns]
    for r, cells in zip(rows, table.rows):
        base = f"{spec['name']}.{r.key}" + (f".{r.group}" if r.group else "")
        for k, c in zip(keys, cells):
            out[f"{base}.{k}"] = c
    return out


def presets_table(title: str, conf_dir: Path = CONF) -> Table:
    """Every preset in ``conf/strategy/*.yaml`` with the grid cell it composes to (read from config)."""
    from omegaconf import OmegaConf

    rows = []
    for f in sorted((conf_dir / "strategy").glob("*.yaml")):
        head = []  # the preset file's leading comment block, as one line
        for ln in f.read_text().splitlines():
            if not ln.startswith("#"):
                break
            head.append(ln.lstrip("#").strip())
        first = " ".join(head)
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            cfg = OmegaConf.to_container(compose([f"+strategy={f.stem}"]), resolve=False)
            axes = grid_axes(cfg) or (MISSING, MISSING, MISSING)
        except (HydraException, OmegaConfBaseException, ValueError) as e:  # say so instead of failing the table
            axes = (MISSING, MISSING, f"(does not compose: {str(e).splitlines()[0][:60]})")
        rows.append([f.stem, *axes, first])
    notes = ["Generated from `conf/strategy/*.yaml`: what = datastore unit, how = control class, "
             "when = schedule class (with the preset's n / θ); the description is the preset file's leading comment."]
    return Table(title, ["preset", "what", "how", "when", "description"], rows, notes, "presets")


def scales_table(title: str, specs: Sequence[dict]) -> Table:
    """The overrides each experiment adds at each scale (what "small" and "full" mean)."""
    rows = []
    for spec in specs:
        if not (spec.get("rows") or spec.get("series")):
            continue
        cells = []
        for scale in SCALES:
            common = list(at_scale(spec.get("scales", {}), scale) or [])
            cell = " ".join(f"`{o}`" for o in common) or "defaults"
            per_row: dict[str, list[str]] = {}
            for e in spec.get("rows") or spec.get("series") or []:
                for o in at_scale(e.get("scales", {}), scale) or []:
                    per_row.setdefault(o, []).append(e["key"])
                sweep = {k: at_scale(v, scale) for k, v in (e.get("sweep") or {}).items()}
                for k, v in sweep.items():
                    per_row.setdefault(f"{k}∈{{{', '.join(override_value(x) for x in v)}}}", []).append(e["key"])
                if scale in (e.get("skip_scales") or []):
                    per_row.setdefault("not run", []).append(e["key"])
            for o, keys in per_row.items():
                cell += f"; `{o}` ({', '.join(keys)})"
            cells.append(cell)
        rows.append([f"`{spec['name']}`", spec["title"].split(".")[0], *cells])
    return Table(title, ["experiment", "for", "small", "full"], rows,
                 ["Overrides that only some rows add name those rows in parentheses; `k∈{…}` is a sweep (one run per value)."], "scales")


def config_values(overrides: Sequence[str], prefix: str = "conf") -> dict[str, str]:
    """Scalar leaves of the composed config as ``conf.<dotted path>`` -> value, so the paper's
    prose quotes settings from the config rather than by hand ({} if it does not compose)."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.to_container(compose(overrides), resolve=True)
    except (HydraException, OmegaConfBaseException, ValueError):
        return {}
    out: dict[str, str] = {}

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif not isinstance(node, list):
            out[path] = override_value(node)

    walk(cfg, prefix)
    return out


def figure_values(spec: dict, collected: Sequence[tuple[Resolved, Optional[Run]]]) -> dict[str, str]:
    """Numbers of a figure for the paper's prose: ``<name>.best_k/best_lmbda/best_perplexity`` (knn_grid),
    ``<name>.<series>.<param values>.rate/quality`` (pareto, size)."""
    out: dict[str, str] = {}
    name = spec["name"]
    for r, run in collected:
        if run is None:
            continue
        if spec["layout"] == "knn_grid":
            pts = dig(run.results, "metrics.knn_grid.points") or []
            if pts:
                best = min(pts, key=lambda p: p["perplexity"])
                out.update({f"{name}.best_k": str(best["k"]), f"{name}.best_lmbda": f"{best['lmbda']:g}",
                            f"{name}.best_perplexity": f"{best['perplexity']:.2f}",
                            f"{name}.perplexity_none": fmt_num(dig(run.results, "metrics.perplexity.perplexity_none"))})
                ctl = dig(run.config, "strategy.control", {})
                own = [p for p in pts if p["k"] == ctl.get("k") and p["lmbda"] == ctl.get("lmbda")]
                if own:  # the grid's arithmetic against the control's own, at the preset's (k, λ)
                    out[f"{name}.at_preset"] = f"{own[0]['perplexity']:.4f}"
                    out[f"{name}.run_perplexity"] = fmt_num(dig(run.results, "metrics.perplexity.perplexity"), 4)
            continue
        tag = "_".join(override_value(v) for v in r.point.params.values()) or "run"
        base = f"{name}.{r.point.key}" + (f".{r.point.group}" if r.point.group else "") + f".{tag}"
        q = quality(run.results)
        out[f"{base}.rate"] = fmt_rate(retrieval_rate(run.results))
        out[f"{base}.quality"] = fmt_num(q.value if q else None, 3 if is_qa(run.results) else 2)
        out[f"{base}.entries"] = fmt_int(dig(run.results, "datastore.size"))
        if not is_qa(run.results):
            out[f"{base}.change"] = fmt_ci(lm_change(run.results), digits=1, pct=True)
    return out


# =========================================================================== figures
def _save(fig, out_stem: Path) -> list[Path]:
    """PNG and PDF with fixed metadata (no dates), so the same data gives the same files."""
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None, "ModDate": None, "Producer": None,
                                                         "Creator": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "svg.hashsalt": "rcd", "pdf.fonttype": 42})
    return plt.subplots(figsize=(4.6, 3.2))


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no finished runs yet\n({what})", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def fig_knn_grid(title: str, runs: Sequence[Run], out_stem: Path) -> list[Path]:
    """Figure 1: perplexity vs λ, one line per k, from a run of :func:`lm_knn_grid`."""
    fig, ax = _figure()
    run = next((r for r in runs if dig(r.results, "metrics.knn_grid.points")), None)
    if run is None:
        _no_data(ax, "kNN-LM λ × k grid")
    else:
        pts = dig(run.results, "metrics.knn_grid.points")
        for k in sorted({p["k"] for p in pts}):
            ps = sorted((p for p in pts if p["k"] == k), key=lambda p: p["lmbda"])
            x = [p["lmbda"] for p in ps]
            ax.plot(x, [p["perplexity"] for p in ps], marker="o", ms=3, label=f"k = {k}")
            ax.fill_between(x, [p["ci_low"] for p in ps], [p["ci_high"] for p in ps], alpha=0.12)
        base = dig(run.results, "metrics.perplexity.perplexity_none")
        if base:
            ax.axhline(base, color="grey", ls="--", lw=1, label="none (λ = 0)")
        ax.set_xlabel("λ (weight of p_kNN)")
        ax.set_ylabel("perplexity")
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, out_stem)


def pareto_front(points: Sequence[tuple[float, float]], lower_is_better: bool = True) -> list[tuple[float, float]]:
    """Points not dominated by another with lower-or-equal cost (x) and better-or-equal quality (y), by x."""
    front: list[tuple[float, float]] = []
    best = math.inf if lower_is_better else -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], p[1] if lower_is_better else -p[1])):
        if (y < best) if lower_is_better else (y > best):
            front.append((x, y))
            best = y
    return front


def fig_pareto(title: str, series: Sequence[tuple[str, list[tuple[Resolved, Run]]]], out_stem: Path) -> list[Path]:
    """Figure 2: quality vs retrieval rate, one line per series (e.g. adaptive θ, fixed strides)."""
    fig, ax = _figure()
    allpts: list[tuple[float, float]] = []
    qa = False
    base = None
    for label, pts in series:
        xy = []
        for r, run in pts:
            q, rate = quality(run.results), retrieval_rate(run.results)
            if q is None or rate is None:
                continue
            qa = qa or is_qa(run.results)
            if base is None and not is_qa(run.results):
                base = dig(run.results, "metrics.perplexity.perplexity_none")
            tag = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in r.point.params.items())
            xy.append((rate, q.value, tag))
        if not xy:
            continue
        xy.sort()
        ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", ms=4, label=label)
        for x, y, tag in xy:
            if tag:
                ax.annotate(tag.split("=", 1)[-1], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        allpts += [(x, y) for x, y, _ in xy]
    if not allpts:
        _no_data(ax, "retrieval-rate sweep")
    else:
        if base:
            ax.scatter([0.0], [base], color="black", marker="s", s=16, label="none", zorder=3)
            allpts.append((0.0, base))
        front = pareto_front(allpts, lower_is_better=not qa)
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", lw=0.8, alpha=0.5,
                label="Pareto front")
        ax.set_xlabel("retrieval rate (share of tokens that retrieve)")
        ax.set_ylabel("exact match" if qa else "perplexity")
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, out_stem)


def fig_size(title: str, series: Sequence[tuple[str, list[tuple[Resolved, Run]]]], out_stem: Path) -> list[Path]:
    """Figure 3: quality vs datastore entries (log x): exact match (QA) or the perplexity change against
    the plain model on the same tokens, in %, with its paired 95% interval (lm)."""
    fig, ax = _figure()
    any_pts = False
    qa = False
    for label, pts in series:
        xy = []
        for _r, run in pts:
            n = dig(run.results, "datastore.size")
            if is_qa(run.results):
                q = exact_match(run.results)
                qa = True
            else:
                c = lm_change(run.results)
                q = None if c is None else Estimate(100 * c.value, None if c.low is None else 100 * c.low,
                                                    None if c.high is None else 100 * c.high)
            if q is None or not n:
                continue
            xy.append((n, q))
        if not xy:
            continue
        any_pts = True
        xy.sort(key=lambda p: p[0])
        x = [p[0] for p in xy]
        y = [p[1].value for p in xy]
        lo = [p[1].value - (p[1].low if p[1].low is not None else p[1].value) for p in xy]
        hi = [(p[1].high if p[1].high is not None else p[1].value) - p[1].value for p in xy]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", ms=4, capsize=2, label=label)
    if not any_pts:
        _no_data(ax, "datastore-size sweep")
    else:
        if not qa:
            ax.axhline(0.0, color="grey", ls="--", lw=1, label="none")
        ax.set_xscale("log")
        ax.set_xlabel("datastore entries")
        ax.set_ylabel("exact match" if qa else "perplexity change vs none (%)")
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, out_stem)


def build_figure(spec: dict, collected: Sequence[tuple[Resolved, Optional[Run]]], out_stem: Path) -> list[Path]:
    done = [(r, run) for r, run in collected if run is not None]
    series: dict[str, tuple[str, list]] = {}
    for r, run in done:
        key = r.point.key + (f" ({r.point.group})" if r.point.group else "")
        label = (r.point.entry_label or r.point.label) + (f" ({r.point.group})" if r.point.group else "")
        series.setdefault(key, (label, []))[1].append((r, run))
    title = spec["title"]
    layout = spec["layout"]
    if layout == "knn_grid":
        return fig_knn_grid(title, [run for _, run in done], out_stem)
    if layout == "pareto":
        return fig_pareto(title, list(series.values()), out_stem)
    if layout == "size":
        return fig_size(title, list(series.values()), out_stem)
    raise ValueError(f"{spec['name']}: unknown figure layout {layout!r} (knn_grid, pareto, size)")


# =========================================================================== paper assembly
_INCLUDE = re.compile(r"^<!--[ \t]*include[ \t]+(\S+)[ \t]*-->[ \t]*$", re.M)
_VALUE = re.compile(r"\{\{\s*([A-Za-z0-9_.\-]+)\s*\}\}")


def render_paper(source: str, base: Path, values: dict[str, str], missing: Optional[list] = None) -> str:
    """Replace ``<!-- include path -->`` lines by the file (relative to ``base``) and ``{{key}}`` by values.

    A missing include or value becomes "–" and is appended to ``missing`` (if given).
    """
    def inc(m):
        p = base / m.group(1)
        if not p.is_file():
            if missing is not None:
                missing.append(m.group(1))
            return f"*({m.group(1)}: not generated yet)*"
        return p.read_text().rstrip("\n")

    def val(m):
        if m.group(1) in values:
            return values[m.group(1)]
        if missing is not None:
            missing.append(m.group(1))
        return MISSING

    return _VALUE.sub(val, _INCLUDE.sub(inc, source))


# =========================================================================== Figure 1 task
def _neighbour_recorder(control, k_max: int):
    """A :class:`~rcd.control.knn.KNNInterpolation` like ``control`` that searches k_max neighbours per
    scored row, keeps them (CPU), and applies the control with its own first k."""
    from rcd.control.knn import KNNInterpolation
    from rcd.datastore.tokens import Neighbours

    class NeighbourRecorder(KNNInterpolation):
        def __init__(self):
            super().__init__(k=control.k, lmbda=control.lmbda, temperature=control.temperature,
                             datastore=control.datastore)
            self.k_max = int(k_max)
            self.scores: list = []
            self.tokens: list = []
            self.metric = "l2"

        def apply(self, scores, *, input_ids=None, hidden=None, fire=None, **_):
            if fire is not None and not bool(fire.all()):
                raise ValueError("lm_knn_grid needs retrieval at every token (schedule every_token)")
            nb = self.datastore.search(hidden, self.k_max)
            self.scores.append(nb.scores.cpu())
            self.tokens.append(nb.tokens.cpu())
            own = Neighbours(scores=nb.scores[:, :self.k], ids=nb.ids[:, :self.k], tokens=nb.tokens[:, :self.k],
                             metric=nb.metric)
            self.metric = nb.metric
            return super().apply(scores, hidden=hidden, fire=None, neighbours=own)

    return NeighbourRecorder()


def knn_grid_nll(nll_lm, scores, tokens, targets, ks, lmbdas, temperature: float, metric: str = "l2") -> dict:
    """Per-token NLL of (1-λ)·p_LM + λ·p_kNN at every (k, λ), from the k_max nearest neighbours.

    ``nll_lm`` [N] = -log p_LM(target), ``scores``/``tokens`` [N, k_max] sorted nearest first,
    ``targets`` [N]. p_kNN(target) = Σ_{i ≤ k, v_i = target} softmax_i(-d_i/T) (s_i/T for ``ip``),
    the arithmetic of :func:`rcd.control.knn.knn_log_probs` restricted to the target token.
    Returns {(k, λ): nll [N] (float64)}.
    """
    import torch

    p_lm = np.exp(-np.asarray(nll_lm, dtype=np.float64))
    out = {}
    for k in ks:
        s = scores[:, :k].float()
        logits = -s / temperature if metric == "l2" else s / temperature
        w = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
        hit = (tokens[:, :k].long() == targets.long().view(-1, 1)).float()
        p_knn = (w * hit).sum(1).double().numpy()
        for lm_ in lmbdas:
            with np.errstate(divide="ignore"):
                out[(int(k), float(lm_))] = -np.log((1.0 - lm_) * p_lm + lm_ * p_knn)
    return out


def lm_knn_grid(cfg, lm, strategy, heldout_ds, provenance) -> dict:
    """Task: the lm task's held-out perplexity with the strategy's kNN-LM control, plus the
    perplexity at every (k, λ) in ``task.grid_ks`` × ``task.grid_lmbdas`` from the same forward
    pass and one search of max(k) neighbours (``metrics.knn_grid.points``: k, lmbda, perplexity,
    ci_low, ci_high). No generation. Used by ``experiments/fig1_knn_grid.yaml``."""
    import torch

    from rcd.control.knn import KNNInterpolation
    from rcd.tasks import lm as lm_task
    from rcd.tasks import perplexity

    ctl = strategy.control
    if not isinstance(ctl, KNNInterpolation):
        raise ValueError(f"lm_knn_grid needs the kNN-LM control (+strategy=per_token), got {type(ctl).__name__}")
    if strategy.schedule is not None and getattr(strategy.schedule, "name", "") != "every_token":
        raise ValueError("lm_knn_grid needs retrieval at every token (strategy/schedule=every_token)")
    t = cfg.task
    ks = sorted({int(k) for k in t.grid_ks})
    lmbdas = sorted({float(x) for x in t.grid_lmbdas})
    if not ks or min(ks) < 1 or not lmbdas or not all(0.0 <= x < 1.0 for x in lmbdas):
        raise ValueError(f"lm_knn_grid: grid_ks must be >= 1 and grid_lmbdas in [0, 1), got {ks} and {lmbdas}")
    rec = _neighbour_recorder(ctl, max(ks + [ctl.k]))
    docs = lm_task.heldout_docs(lm, heldout_ds, t.eval_tokens, t.get("prefix_token"))
    ppl = perplexity.PerplexityResult.pool([perplexity.score(lm, d["ids"], rec, None, window=t.window, stride=t.stride)
                                           for d in docs])
    k_max = min(rec.k_max, len(ctl.datastore))
    scores = torch.cat(rec.scores)
    tokens = torch.cat(rec.tokens)
    targets = torch.cat([d["ids"][1:] for d in docs]).cpu()
    grid = knn_grid_nll(ppl.nll_none, scores, tokens, targets, [min(k, k_max) for k in ks], lmbdas,
                        ctl.temperature, rec.metric)
    points = []
    for (k, lam), nll in sorted(grid.items()):
        e = perplexity_ci(nll)
        points.append({"k": k, "lmbda": lam, "perplexity": e.value, "ci_low": e.low, "ci_high": e.high})
    provenance.append({"task": "knn_grid", "k_max": k_max, "queries": int(scores.shape[0]),
                       "note": "neighbours searched once at k_max for all grid points"})
    per_example = {"nll_none": [round(float(x), 5) for x in ppl.nll_none],
                   "nll": [round(float(x), 5) for x in ppl.nll]}
    return {"metrics": {"perplexity": ppl.summary(), "generation": {},
                        "knn_grid": {"temperature": ctl.temperature, "k_max": k_max, "points": points}},
            "per_example": per_example, "samples": {}, "prompts": []}
