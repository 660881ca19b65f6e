"""``rcd-compare RUN_DIR...``: one table of finished runs, each against a baseline row, with paired CIs.

Arguments are run folders (holding ``results.json``) or folders above them: a multirun's sweep folder (its
``runs.jsonl`` lists the run folder of every job, reused jobs included), a ``runs/`` root. Runs are grouped
by task (a table each: perplexity and QA scores do not share columns); within a table each row is named by
the config values that differ between its runs (the overrides of a sweep, e.g. ``strategy.control.k=64``),
and reports:

* quality with a 95% bootstrap interval: perplexity (``task=lm``), or exact match and answer in output (QA);
* Δ against the baseline row with a *paired* bootstrap interval over the same tokens / questions (the
  per-token NLL, or the per-question score, of both runs resampled together): the relative perplexity
  change, or the difference in answer in output; rows that scored other tokens / questions are not
  paired (``–``, and a note says so);
* retrieval rate, decode tok/s and its ratio to the plain model measured in the same run, time to first
  token, and the scoring seconds (with ÷ plain) for the LM task;
* whether a result was computed by other rcd code (``reused_other_code`` or another source fingerprint).

The baseline row (``--baseline``): a row number (1-based), or ``key=value`` of the differing config values,
or a label; default the plain model (``strategy.name=none``) when it is among the runs, else the first row.
Written to ``--out`` (default: the single folder argument, else ``./compare``) as ``compare.md``, ``.tex``,
``.csv`` and a quality-vs-cost plot ``compare.png`` / ``.pdf``. A ``--multirun`` of ``rcd.run`` prints
and writes it at the end (:class:`CompareCallback`).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from rcd.errors import EXIT_CODE, RcdError

#: config keys that never say what a run computes (paths, switches, seeds of the launcher)
_IGNORED = ("force", "reuse", "progress", "runs_root", "datastore_root", "threads", "hydra")


@dataclass
class Entry:
    folder: Path
    results: dict
    config: dict
    label: str = ""
    values: dict = field(default_factory=dict)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            if not prefix and k in _IGNORED:
                continue
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: json.dumps(d, sort_keys=True) if isinstance(d, (list, tuple)) else d}


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders named by ``paths`` (module doc), each once, in the order given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise RcdError(f"{p}: no such folder: give run folders (with results.json) or a folder above them")
        if (p / "results.json").is_file():
            found = [p]
        elif (p / "runs.jsonl").is_file():
            found = [Path(json.loads(line)["folder"]) for line in (p / "runs.jsonl").read_text().splitlines()
                     if line.strip() and json.loads(line).get("folder")]
        else:
            found = sorted(f.parent for f in p.rglob("results.json") if ".multirun" not in f.parts[len(p.parts):])
        if not found:
            raise RcdError(f"{p}: holds no finished run (no results.json below it): run it first, or name the "
                           "run folders")
        for f in found:
            if f.resolve() not in {x.resolve() for x in out}:
                out.append(f)
    return out


def load(folders: Sequence[Path]) -> list[Entry]:
    from omegaconf import OmegaConf

    entries = []
    for f in folders:
        if not (f / "results.json").is_file():
            raise RcdError(f"{f}: has no results.json (unfinished or removed): rerun it, or leave it out")
        cfg = OmegaConf.to_container(OmegaConf.load(f / "config.yaml"), resolve=False) \
            if (f / "config.yaml").is_file() else {}
        entries.append(Entry(folder=f, results=json.loads((f / "results.json").read_text()), config=cfg))
    return entries


def label_rows(entries: list[Entry]) -> list[str]:
    """Name each entry by its strategy label and the config values that differ between the entries having them;
    returns the keys that name rows (``strategy`` when the strategies differ)."""
    flats = [_flat(e.config) for e in entries]
    keys = sorted({k for f in flats for k in f})
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
    naming: set[str] = set()
    # a row is named by its strategy label, then by each differing value it has that differs among the rows
    # having that key (a plain run has no datastore keys: they do not name it, nor the other rows)
    for e, f in zip(entries, flats):
        e.values = {k: f.get(k) for k in differ}
        parts = []
        for k in differ:
            if k.endswith("_target_") or k == "strategy.name" or k not in f or f[k] is None:
                continue
            having = {json.dumps(g[k], sort_keys=True, default=str) for g in flats if g.get(k) is not None}
            if len(having) > 1:
                parts.append(f"{k}={f[k]}")
        strategy = (e.results.get("run") or {}).get("strategy") or f.get("strategy.name") or "?"
        e.label = strategy + (f" ({', '.join(parts)})" if parts else "")
        naming.update(p.split("=", 1)[0] for p in parts)
    return sorted(naming) + (["strategy"] if len({e.label.split(" (")[0] for e in entries}) > 1 else [])


def _paired(a: Optional[list], b: Optional[list]) -> bool:
    return bool(a) and bool(b) and len(a) == len(b)


def _same_items(e: Entry, base: Entry, task: str) -> bool:
    from rcd.paper.experiments import dig

    if task == "lm":
        return dig(e.results, "metrics.perplexity.documents") == dig(base.results, "metrics.perplexity.documents")
    ids = lambda x: [q.get("id") for q in dig(x.results, "per_example.examples", []) or []]  # noqa: E731
    return ids(e) == ids(base) and bool(ids(e))


def _nll(e: Entry) -> Optional[list]:
    pe = e.results.get("per_example") or {}
    return pe.get("nll") or pe.get("nll_none")


def choose_baseline(entries: list[Entry], spec: Optional[str]) -> int:
    if spec is None:
        for i, e in enumerate(entries):
            if (e.results.get("run") or {}).get("strategy") == "none":
                return i
        return 0
    if spec.isdigit():
        i = int(spec) - 1
        if not 0 <= i < len(entries):
            raise RcdError(f"--baseline {spec}: there are {len(entries)} rows (1..{len(entries)})")
        return i
    for i, e in enumerate(entries):
        if e.label == spec or ("=" in spec and str(e.values.get(spec.split("=", 1)[0])) == spec.split("=", 1)[1]):
            return i
    raise RcdError(f"--baseline {spec!r}: no row has that label or value; rows: "
                   + "; ".join(f"{i + 1}: {e.label}" for i, e in enumerate(entries)))


def compare_task(task: str, entries: list[Entry], baseline: Optional[str] = None):
    """A :class:`rcd.paper.tables.Table` of ``entries`` (one task) and the points of the plot."""
    from rcd.identity import computed_by_this_code
    from rcd.paper import stats
    from rcd.paper.experiments import dig
    from rcd.paper.tables import MISSING, Table, fmt_ci, fmt_num, fmt_rate

    differ = label_rows(entries)
    b = choose_baseline(entries, baseline)
    base = entries[b]
    notes, points = [], []
    qa = task != "lm"
    if qa:
        cols = ["#", "run", "exact match [95% CI]", "answer in output [95% CI]", f"Δ answer in output vs #{b + 1} "
                "[paired CI]", "retrieval rate", "decode tok/s", "time to 1st tok (s)"]
    else:
        cols = ["#", "run", "perplexity [95% CI]", f"Δ perplexity vs #{b + 1} [paired CI]", "retrieval rate",
                "decode tok/s", "tok/s ÷ none", "scoring s (÷ none)"]
    rows, unpaired, other_code = [], [], []
    for i, e in enumerate(entries):
        r = e.results
        if not computed_by_this_code(r) or dig(r, "run.reused_other_code"):
            other_code.append(str(i + 1))
        same = _same_items(e, base, "lm" if not qa else "qa")
        if qa:
            cont = dig(r, "per_example.contains")
            cont_b = dig(base.results, "per_example.contains")
            c_est = stats.mean_ci([float(x) for x in cont]) if cont else None
            if i == b:
                delta = "(baseline)"
            elif same and _paired(cont, cont_b):
                d = stats.mean_ci([float(x) - float(y) for x, y in zip(cont, cont_b)])
                delta = fmt_ci(d, 3)
            else:
                delta = MISSING
                unpaired.append(str(i + 1))
            q = stats.exact_match(r)
            rows.append([str(i + 1), e.label, fmt_ci(q, 3), fmt_ci(c_est, 3), delta, fmt_rate(stats.retrieval_rate(r)),
                         fmt_num(stats.tokens_per_second(r), 1), fmt_num(stats.time_to_first_token(r), 3)])
            y = c_est.value if c_est else None
        else:
            nll, nll_b = _nll(e), _nll(base)
            ppl = stats.lm_perplexity(r)
            if i == b:
                delta = "(baseline)"
            elif same and _paired(nll, nll_b):
                delta = fmt_ci(stats.relative_change_ci(nll, nll_b), 1, pct=True)
            else:
                delta = MISSING
                unpaired.append(str(i + 1))
            p = dig(r, "metrics.scoring_time", {}) or {}
            sec, sec0 = p.get("seconds"), p.get("seconds_none")
            scoring = MISSING if sec is None else f"{sec:.1f}" + (f" ({sec / sec0:.2f}×)" if sec0 else "")
            rows.append([str(i + 1), e.label, fmt_ci(ppl, 2), delta, fmt_rate(stats.retrieval_rate(r)),
                         fmt_num(stats.tokens_per_second(r), 1), fmt_num(stats.throughput_ratio(r), 2), scoring])
            y = ppl.value if ppl else None
        cost = stats.tokens_per_second(r)
        if y is not None and cost:
            points.append((e.label, 1.0 / cost, y))
    title = f"Comparison: {task}, {len(entries)} runs, baseline #{b + 1} ({base.label})"
    if differ:
        shown = [k for k in differ if not k.endswith("_target_")]
        notes.append("Rows differ in: " + ", ".join(shown[:12]) + (f" and {len(shown) - 12} more" if len(shown) > 12
                                                                 else "") + ".")
    notes.append("CIs: percentile bootstrap, 1000 resamples; Δ resamples both runs' tokens (questions) together.")
    if unpaired:
        notes.append(f"Not paired with the baseline (other tokens or questions scored): rows {', '.join(unpaired)}.")
    if other_code:
        notes.append(f"Computed by other rcd code than this one: rows {', '.join(other_code)} (rerun with force=true).")
    return Table(title=title, columns=cols, rows=rows, notes=notes), points, "answer in output" if qa else "perplexity"


def csv_text(table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(table.columns)
    w.writerows(table.rows)
    return buf.getvalue()


def plot(points: list[tuple[str, float, float]], ylabel: str, title: str, out_stem: Path) -> list[Path]:
    """Quality vs cost (seconds per decoded token), one labelled point per run."""
    from rcd.paper.figures import _figure, _save

    fig, ax = _figure()
    for i, (label, x, y) in enumerate(points):
        ax.scatter([x * 1000], [y], s=18)
        ax.annotate(label if len(label) < 40 else label[:37] + "...", (x * 1000, y), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("cost: ms per decoded token")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    return _save(fig, out_stem)


def compare(paths: Sequence[str | Path], out: Optional[Path] = None, baseline: Optional[str] = None,
            name: str = "compare", quiet: bool = False) -> dict[str, Any]:
    """Build, print and write the comparison of the runs under ``paths`` (module doc)."""
    entries = load(find_runs(paths))
    by_task: dict[str, list[Entry]] = {}
    for e in entries:
        task = "lm" if isinstance((e.results.get("metrics") or {}).get("perplexity"), dict) else \
            str((e.config.get("task") or {}).get("name") or "qa")
        by_task.setdefault(task, []).append(e)
    out = Path(out) if out is not None else (Path(paths[0]) if len(paths) == 1 and not
                                             (Path(paths[0]) / "results.json").is_file() else Path("compare"))
    out.mkdir(parents=True, exist_ok=True)
    md, tex, csvs, files = [], [], [], []
    for task, group in by_task.items():
        table, points, ylabel = compare_task(task, group, baseline if len(by_task) == 1 else None)
        md.append(table.markdown())
        tex.append(table.latex())
        csvs.append(csv_text(table))
        stem = out / (name if len(by_task) == 1 else f"{name}_{task}")
        if points:
            files += plot(points, ylabel, table.title, stem)
    (out / f"{name}.md").write_text("\n".join(md))
    (out / f"{name}.tex").write_text("\n".join(tex))
    (out / f"{name}.csv").write_text("\n".join(csvs))
    files = [out / f"{name}.md", out / f"{name}.tex", out / f"{name}.csv"] + files
    if not quiet:
        print("\n".join(md))
        print("[rcd] comparison: " + ", ".join(str(f) for f in files))
    return {"markdown": "\n".join(md), "files": files, "runs": len(entries)}


def _callback_base():
    from hydra.experimental.callback import Callback

    return Callback


class CompareCallback(_callback_base()):
    """Hydra callback of ``rcd.run --multirun``: at the end, the comparison of every job's run folder (listed in
    ``<sweep dir>/runs.jsonl`` by each job, reused ones included), written into the sweep folder."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = bool(enabled)

    def on_multirun_start(self, config, **kw) -> None:
        runs = Path(config.hydra.sweep.dir) / "runs.jsonl"
        runs.unlink(missing_ok=True)  # a sweep folder reused by a later sweep lists that sweep's jobs only

    def on_multirun_end(self, config, **kw) -> None:
        sweep = Path(config.hydra.sweep.dir)
        if not self.enabled or not (sweep / "runs.jsonl").is_file():
            return
        try:
            compare([sweep], out=sweep)
        except (RcdError, OSError, ValueError) as e:
            print(f"[rcd] comparison not written: {e}", file=sys.stderr)


def record_job(folder: str) -> None:
    """Append this multirun job's run folder to ``<sweep dir>/runs.jsonl`` (one line; O_APPEND keeps lines whole)."""
    from hydra.core.hydra_config import HydraConfig

    sweep = Path(HydraConfig.get().sweep.dir)
    sweep.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"job": HydraConfig.get().job.num, "folder": str(Path(folder).resolve())}) + "\n"
    with open(sweep / "runs.jsonl", "a") as f:
        f.write(line)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="rcd-compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="run folders, a multirun sweep folder, or a runs/ root")
    ap.add_argument("--baseline", help="row number (1-based), key=value of a differing config value, or a label")
    ap.add_argument("--out", type=Path, help="folder for compare.md/.tex/.csv/.png/.pdf")
    ap.add_argument("--name", default="compare", help="file name stem (default: compare)")
    args = ap.parse_args(argv)
    try:
        compare(args.paths, out=args.out, baseline=args.baseline, name=args.name)
    except RcdError as e:
        print(f"[rcd] error: {e}", file=sys.stderr)
        sys.exit(EXIT_CODE)


if __name__ == "__main__":
    main()
