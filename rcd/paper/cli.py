"""Regenerate the paper from run folders: ``rcd-paper <command> [--scale small|full]`` in a project folder
(``experiments/``, ``paper/paper.src.md``), or ``python scripts/paper.py <command>`` in the rcd checkout.

Commands (one or more, e.g. ``tables figures paper``)
  run      run every pending point of ``experiments/*.yaml`` as one Hydra multirun (``python -m rcd.run
           --multirun hydra/sweeper=rcd_list``) through the launcher of ``--launcher`` (basic, processes,
           submitit_local, slurm); finished runs are reused, so an interrupted regeneration resumes
  tables   aggregate run folders into ``paper/tables/<experiment>.md`` and ``.tex`` (+ ``values.json``)
  figures  plot ``paper/figures/<experiment>.png`` and ``.pdf``
  paper    render ``paper/paper.src.md`` into ``paper/paper.md`` (tables included, ``{{values}}`` filled)
  all      run, tables, figures, paper (what ``make paper`` does)
  plan     list every point of every experiment with its run folder and status; runs nothing

Runs of experiment ``<name>`` go to ``<runs>/<name>/`` (``--runs``, default ``$RCD_RUNS`` or ``runs``).
A row whose preset does not exist yet (or whose grid cell is refused at start-up) is reported and
skipped, and its table cells read "–".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from rcd.paper import experiments, figures, render, stats, tables

#: the project folder: experiments/, paper/ and runs/ are found under it (the working directory for
#: ``rcd-paper``, the checkout for scripts/paper.py); set by :func:`main`
REPO = Path.cwd()
EXPERIMENTS = REPO / "experiments"


def specs(only: list[str] | None) -> list[dict]:
    out = [experiments.load_spec(p) for p in sorted(EXPERIMENTS.glob("*.yaml"))]
    if not out:
        raise SystemExit(f"no experiment specs in {EXPERIMENTS}")
    if only:
        unknown = set(only) - {s["name"] for s in out}
        if unknown:
            raise SystemExit(f"unknown experiment(s) {sorted(unknown)}; known: {[s['name'] for s in out]}")
        out = [s for s in out if s["name"] in only]
    return out


def runnable(spec: dict) -> bool:
    return bool(spec.get("rows") or spec.get("series"))


def root_of(spec: dict, runs: Path) -> Path:
    return experiments.experiment_root(runs, spec)


# ------------------------------------------------------------------------------------------ run
#: --launcher names -> Hydra launcher configs (conf/hydra/launcher/), and the override that bounds
#: how many runs go at once (--jobs). Any other name is passed to hydra/launcher= as is.
LAUNCHERS = {
    "basic": ("basic", None),  # Hydra's own: one run after another, in the sweep's process
    "processes": ("rcd_processes", "hydra.launcher.n_jobs={jobs}"),  # joblib/loky worker processes
    "submitit_local": ("rcd_submitit_local", "hydra.sweeper.max_batch_size={jobs}"),  # submitit subprocesses
    "slurm": ("rcd_slurm", "hydra.launcher.array_parallelism={jobs}"),  # SLURM array jobs via submitit
}


def default_launcher(jobs: int) -> str:
    """``processes`` when runs go at once and the joblib launcher is installed (``rcd[cluster]``), else ``basic``."""
    if jobs <= 1:
        return "basic"
    try:
        import hydra_plugins.hydra_joblib_launcher  # noqa: F401
    except ImportError:
        print("[paper] hydra-joblib-launcher is not installed (pip install rcd[cluster]): runs go one at a time",
              flush=True)
        return "basic"
    return "processes"


def launcher_overrides(name: str, jobs: int) -> list[str]:
    cfg_name, bound = LAUNCHERS.get(name, (name, None))
    return [f"hydra/launcher={cfg_name}"] + ([bound.format(jobs=jobs)] if bound and jobs > 1 else [])


def run_experiments(args) -> dict:
    """Run every pending point as one Hydra multirun (rcd's list sweeper over the plan, the launcher chosen
    with --launcher); returns the regeneration record (also written to paper/tables)."""
    t_all, t_epoch = time.perf_counter(), time.time()
    jobs = max(1, int(args.jobs or 1))
    launcher = args.launcher or default_launcher(jobs)
    record = {"scale": args.scale, "threads": args.threads, "machine": machine(), "experiments": [],
              "jobs": jobs, "launcher": launcher}
    loads: list[float] = []
    stop = threading.Event()

    def sample_load():  # the machine may be shared: keep its load next to the wall time
        while not stop.is_set():
            loads.append(os.getloadavg()[0])
            stop.wait(15)

    sampler = threading.Thread(target=sample_load, daemon=True)
    sampler.start()
    plan = []  # (record of its experiment, resolved point, overrides of its job)
    recs = []
    for spec in specs(args.only):
        if not runnable(spec):
            continue
        root = root_of(spec, args.runs)
        rec = {"name": spec["name"], "points": 0, "reused": 0, "ran": 0, "failed": 0, "skipped": [],
               "wall_s": 0.0, "cpu_s": 0.0}
        recs.append(rec)
        for entry in experiments.entries(spec, args.scale):
            resolved = [experiments.resolve(p, root) for p in entry.points()]
            rec["points"] += len(resolved)
            errors = sorted({r.error for r in resolved if r.error})
            tag = f"{spec['name']}/{entry.key}" + (f"/{entry.group}" if entry.group else "")
            if errors:
                print(f"[paper] {tag}: skipped ({'; '.join(errors)})", flush=True)
                rec["skipped"].append(f"{entry.key}{'/' + entry.group if entry.group else ''}: {'; '.join(errors)}")
                continue
            pending = list(resolved) if args.force else [r for r in resolved if not r.done]
            rec["reused"] += len(resolved) - len(pending)
            if not pending:
                print(f"[paper] {tag}: {len(resolved)} finished run(s) reused", flush=True)
                continue
            print(f"[paper] {tag}: {len(pending)} of {len(resolved)} point(s) to run", flush=True)
            stale = [r for r in pending if r.stale]
            if stale and not args.force:
                print(f"[paper] {tag}: {len(stale)} finished by other rcd code, rerun (force=true)", flush=True)
            plan += [(rec, r, r.point.overrides + [f"runs_root={root}"] + (["force=true"] if r.stale else []))
                     for r in pending]
    if plan:
        sweep = args.runs / ".sweeps" / time.strftime("%Y%m%d-%H%M%S")
        sweep.mkdir(parents=True, exist_ok=True)
        (sweep / "jobs.jsonl").write_text("".join(json.dumps(ov) + "\n" for _, _, ov in plan))
        cmd = [sys.executable, "-m", "rcd.run", "--multirun", "hydra/sweeper=rcd_list",
               f"hydra.sweeper.jobs_file={sweep / 'jobs.jsonl'}", f"hydra.sweeper.status_file={sweep / 'status.jsonl'}",
               f"hydra.sweep.dir={sweep}"] + launcher_overrides(launcher, jobs) + list(args.launcher_override or []) + [
               "progress=false"] + ([f"threads={args.threads}"] if args.threads else []) + (["force=true"] if args.force else [])
        env = dict(os.environ)
        if args.threads:  # also for the sweep's own process (the basic launcher runs jobs in it)
            env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        log = sweep / "sweep.log"
        print(f"[paper] {len(plan)} run(s) through hydra/launcher={launcher_overrides(launcher, jobs)[0].split('=', 1)[1]}"
              f" ({jobs} at once) -> {log}", flush=True)
        t_start = time.time()
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        status = {}
        if (sweep / "status.jsonl").is_file():
            status = {s["job"]: s for s in map(json.loads, (sweep / "status.jsonl").read_text().splitlines())}
        for i, (rec, r, _) in enumerate(plan):
            res = r.folder / "results.json"
            fresh = res.is_file() and res.stat().st_mtime > t_start  # written by this sweep
            if fresh:
                rec["ran"] += 1
                timing = json.loads(res.read_text()).get("timing", {})
                rec["wall_s"] += float(timing.get("total_s", 0.0))  # summed over its runs (they may overlap)
                rec["cpu_s"] += float(timing.get("cpu_s", 0.0))
                continue
            rec["failed"] += 1
            why = (status.get(i) or {}).get("error") or f"no results (sweep exit {proc.returncode}, see {log})"
            rec["skipped"].append(f"{r.point.key}{'/' + r.point.group if r.point.group else ''} {r.point.params or ''}: "
                                  f"failed: {why[:200]}")
            print(f"[paper] {r.point.experiment}/{r.point.key}: FAILED: {why[:200]}", flush=True)
        print(f"[paper] sweep: {sum(e['ran'] for e in recs)} ran, {sum(e['failed'] for e in recs)} failed, "
              f"{time.time() - t_start:.0f} s", flush=True)
    started, ended = round(t_epoch, 1), round(time.time(), 1)
    for rec in recs:
        rec["wall_s"], rec["cpu_s"] = round(rec["wall_s"], 1), round(rec["cpu_s"], 1)
        rec.update(started=started, ended=ended, jobs=jobs)  # this invocation's interval: merges take unions
        record["experiments"].append(rec)
    record["wall_s"] = round(time.perf_counter() - t_all, 1)  # elapsed, whatever ran in parallel
    record["wall_kind"] = "elapsed"
    record["cpu_s"] = round(sum(e["cpu_s"] for e in record["experiments"]), 1)
    stop.set()
    sampler.join()
    record["load_mean"] = round(sum(loads) / len(loads), 2)
    record["load_max"] = round(max(loads), 2)
    return record


def machine() -> str:
    """CPU model and core count, and the GPU if ``nvidia-smi`` sees one."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = f"{os.cpu_count()} cores of {cpu}"
    try:
        gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip()
        if gpus:
            out += "; " + "; ".join(g.split(" (UUID")[0] for g in gpus.splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def merged_wall(exps: list[dict]) -> tuple[float, str]:
    """Wall time of experiments run by several invocations: the union of their invocations' [started,
    ended] intervals (invocations that overlapped count once); an entry written before intervals were
    recorded adds its summed run times. Returns (seconds, "elapsed" | "elapsed + summed run times")."""
    spans = sorted({(e["started"], e["ended"]) for e in exps if "started" in e and "ended" in e})
    total, end = 0.0, None
    for a, b in spans:
        if end is None or a > end:
            total, end = total + (b - a), b
        elif b > end:
            total, end = total + (b - end), b
    summed = [e["wall_s"] for e in exps if "started" not in e or "ended" not in e]
    return round(total + sum(summed), 1), ("elapsed + summed run times" if summed else "elapsed")


def wall_kind(record: dict) -> str:
    """What a record's ``wall_s`` is (a merged record written before ``wall_kind`` existed: summed run times)."""
    return record.get("wall_kind") or ("summed run times" if record.get("partial") else "elapsed")


def runs_at_once(record: dict) -> str:
    """Runs at once of a record: its own, or for a merged one each invocation's ("1/2"); "a varying number of"
    when a merged entry does not say (written before entries recorded it)."""
    if not record.get("partial"):
        return str(record.get("jobs", 1))
    jobs = [e.get("jobs") for e in record["experiments"]]
    return "/".join(sorted({str(j) for j in jobs})) if all(j is not None for j in jobs) else "a varying number of"


def write_regeneration(record: dict, out: Path, merge: bool = False) -> None:
    """Write ``regeneration.json``/``.md``; ``merge`` (a run with --only) updates only its experiments'
    entries of the previous record of the same scale."""
    out.mkdir(parents=True, exist_ok=True)
    old = out / "regeneration.json"
    if merge and old.is_file():
        prev = json.loads(old.read_text())
        if prev.get("scale") == record["scale"]:
            mine = {e["name"] for e in record["experiments"]}
            merged = [e for e in prev["experiments"] if e["name"] not in mine] + record["experiments"]
            record["experiments"] = sorted(merged, key=lambda e: e["name"])
            record["wall_s"], record["wall_kind"] = merged_wall(record["experiments"])
            record["cpu_s"] = round(sum(e.get("cpu_s", 0.0) for e in record["experiments"]), 1)
            record["partial"] = True  # merged from more than one invocation
            record["jobs"] = runs_at_once(record)
    (out / "regeneration.json").write_text(json.dumps(record, indent=2) + "\n")
    render_regeneration(record, out)


def render_regeneration(record: dict, out: Path) -> None:
    """``regeneration.md`` from a record (``tables`` renders it again from ``regeneration.json``)."""
    rows = [[e["name"], str(e["points"]), str(e["ran"]), str(e["reused"]), str(e["failed"]), f"{e['wall_s']:.0f}",
             f"{e.get('cpu_s', 0.0):.0f}", "; ".join(e["skipped"]) or experiments.MISSING] for e in record["experiments"]]
    cmd = record.get("command", "")
    t = tables.Table(f"Regeneration log (scale: {record['scale']})",
                     ["experiment", "points", "ran", "reused", "failed", "run time, summed (s)", "CPU (s)",
                      "skipped / failed rows"],
                     rows,
                     [f"Command: `{cmd}`; total wall time ({wall_kind(record)}) {record['wall_s']:.0f} s "
                      f"({record['wall_s'] / 60:.1f} min), CPU time of the runs {record.get('cpu_s', 0.0):.0f} s "
                      f"({record.get('cpu_s', 0.0) / 60:.1f} min), on {record.get('machine', 'an unrecorded machine')}; "
                      f"threads per run: {record['threads'] or 'torch default'}; runs at once: {runs_at_once(record)} "
                      f"(Hydra launcher: {record.get('launcher', 'basic')})"
                      "; an experiment's run time is the sum over its runs, which may have overlapped; "
                      f"{'merged from several invocations; ' if record.get('partial') else ''}"
                      f"1-minute load average during the runs: mean {record.get('load_mean', '?')}, "
                      f"max {record.get('load_max', '?')} ({os.cpu_count()} cores; other jobs share the machine). "
                      "Wall time depends on how many runs were reused and on the machine's load."])
    (out / "regeneration.md").write_text(t.markdown())


# ------------------------------------------------------------------------------------------ tables
def scale_note(spec: dict, scale: str, runs: Path) -> str:
    common = experiments.at_scale(spec.get("scales", {}), scale) or []
    ov = " ".join(f"`{o}`" for o in common) or "defaults"
    return (f"Scale: **{scale}** ({ov}); spec `experiments/{spec['name']}.yaml`, runs in "
            f"`{os.path.relpath(root_of(spec, runs), REPO)}/`.")


def collected_rows(spec: dict, args) -> tuple[list, list[tables.Row]]:
    col = experiments.collect(spec, args.scale, root_of(spec, args.runs)) if runnable(spec) else []
    return col, tables.rows_of(col)


def make_tables(args) -> dict[str, str]:
    out = args.out / "tables"
    out.mkdir(parents=True, exist_ok=True)
    values: dict[str, str] = {"scale": args.scale}
    all_specs = {s["name"]: s for s in specs(None)}
    compute_s = 0.0
    n_runs = 0
    builds: dict[str, float] = {}  # datastore folder -> one-time build seconds (manifest)
    for spec in specs(args.only):
        if spec["kind"] != "table":
            continue
        if spec["layout"] == "cost":
            rows = []
            for name in spec.get("from", []):
                src = all_specs[name]
                for r in collected_rows(src, args)[1]:
                    label = r.label + (f" ({dict((g['key'], g.get('label', g['key'])) for g in src.get('groups') or []).get(r.group, r.group)})" if r.group else "")
                    rows.append(tables.Row(r.key, label, r.group, r.run))
        else:
            rows = collected_rows(spec, args)[1]
        table = tables.build_table(spec, rows)
        table.notes.append(scale_note(spec, args.scale, args.runs) if spec["layout"] != "cost"
                           else f"Scale: **{args.scale}**; rows from {', '.join('`' + n + '`' for n in spec.get('from', []))}.")
        (out / f"{spec['name']}.md").write_text(table.markdown())
        (out / f"{spec['name']}.tex").write_text(table.latex())
        values.update(tables.table_values(spec, rows, table))
        print(f"[paper] table {out / (spec['name'] + '.md')}: {sum(r.run is not None for r in rows)}/{len(rows)} rows")
    values.update(tables.config_values(["+strategy=per_token"]))
    scales = tables.scales_table("What each scale runs", specs(None))
    scales.notes.append(f"Scale of this build: **{args.scale}**.")
    for name, t in (("presets", tables.presets_table("Presets: named points of the grid")), ("scales", scales)):
        (out / f"{name}.md").write_text(t.markdown())
        (out / f"{name}.tex").write_text(t.latex())
    for spec in specs(None):
        if runnable(spec):
            col = experiments.collect(spec, args.scale, root_of(spec, args.runs))
            if spec["kind"] == "figure":
                values.update(figures.figure_values(spec, col))
            for _r, run in col:
                if run is not None:
                    n_runs += 1
                    compute_s += float(experiments.dig(run.results, "timing.total_s", 0.0))
                    b = stats.datastore_build_seconds(run.results)
                    if b is not None:
                        builds[experiments.dig(run.results, "datastore.folder")] = float(b)
    values["compute.runs"] = str(n_runs)
    values["datastores.count"] = str(len(builds))
    values["datastores.build_minutes"] = f"{sum(builds.values()) / 60:.1f}"
    values["compute.minutes"] = f"{compute_s / 60:.1f}"
    regen = out / "regeneration.json"
    if regen.is_file():
        r = json.loads(regen.read_text())
        render_regeneration(r, out)
        values["regen.minutes"] = f"{r['wall_s'] / 60:.1f}"
        values["regen.wall_kind"] = wall_kind(r)
        values["regen.jobs"] = runs_at_once(r)
        values["regen.cpu_minutes"] = f"{r.get('cpu_s', 0.0) / 60:.1f}"
        values["regen.load_mean"] = str(r.get("load_mean", experiments.MISSING))
        values["regen.scale"] = r["scale"]
        values["regen.ran"] = str(sum(e["ran"] for e in r["experiments"]))
        values["regen.reused"] = str(sum(e["reused"] for e in r["experiments"]))
        values["regen.machine"] = r.get("machine", experiments.MISSING)
        values["regen.threads"] = str(r.get("threads") or "torch's default number of")
    (out / "values.json").write_text(json.dumps(values, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return values


def make_figures(args) -> None:
    out = args.out / "figures"
    for spec in specs(args.only):
        if spec["kind"] != "figure":
            continue
        col = experiments.collect(spec, args.scale, root_of(spec, args.runs))
        paths = figures.build_figure(spec, col, out / spec["name"])
        n = sum(run is not None for _, run in col)
        print(f"[paper] figure {paths[0]} (+ .pdf): {n}/{len(col)} runs")


def make_paper(args) -> None:
    values = json.loads((args.out / "tables" / "values.json").read_text())
    src = (args.out / "paper.src.md").read_text()
    missing: list = []
    text = render.render_paper(src, args.out, values, missing)
    header = "<!-- generated by scripts/paper.py from paper/paper.src.md and paper/tables/*; do not edit -->\n"
    (args.out / "paper.md").write_text(header + text)
    print(f"[paper] {args.out / 'paper.md'}" + (f" (missing: {', '.join(sorted(set(missing)))})" if missing else ""))


def print_plan(args) -> None:
    for spec in specs(args.only):
        if not runnable(spec):
            continue
        for r, run in experiments.collect(spec, args.scale, root_of(spec, args.runs)):
            status = "done" if run is not None else (f"skip: {r.error}" if r.error else "pending")
            where = os.path.relpath(r.folder, REPO) if r.folder else "-"
            print(f"{spec['name']}\t{r.point.key}\t{r.point.group or '-'}\t{r.point.params or ''}\t{status}\t{where}")


def main(argv=None, project: Path | None = None) -> None:
    """``rcd-paper`` (console script); ``project``: the folder holding experiments/ and paper/ (default: cwd)."""
    global REPO, EXPERIMENTS
    REPO = Path(project).resolve() if project is not None else Path.cwd()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="+", choices=["run", "tables", "figures", "paper", "all", "plan"],
                    help="one or more steps, run in the order run, tables, figures, paper")
    ap.add_argument("--scale", choices=experiments.SCALES, default="small")
    ap.add_argument("--runs", type=Path, default=Path(os.environ.get("RCD_RUNS", "runs")),
                    help="root of run folders (experiment <name> -> <runs>/<name>/)")
    ap.add_argument("--only", nargs="*", help="experiment names (default: all)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per run (default: 1 at small scale, torch's default at full)")
    ap.add_argument("--out", type=Path, default=REPO / "paper", help="paper folder (tables/, figures/, paper.src.md)")
    ap.add_argument("--experiments", type=Path, default=None, help="folder of experiment specs (default: experiments/)")
    ap.add_argument("--force", action="store_true", help="rerun finished runs too (force=true)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="runs at once (default: the number of cores at small scale, where each run has 1 thread; "
                         "1 at full scale)")
    ap.add_argument("--launcher", default=None,
                    help=f"Hydra launcher of the runs: {', '.join(LAUNCHERS)} (conf/hydra/launcher/), or any "
                         "hydra/launcher name; default: processes when --jobs > 1 and rcd[cluster] is installed, else basic")
    ap.add_argument("--launcher-override", nargs="*", metavar="KEY=VALUE",
                    help="extra Hydra overrides of the sweep, e.g. hydra.launcher.partition=gpu")
    args = ap.parse_args(argv)
    EXPERIMENTS = args.experiments or (REPO / "experiments")
    if args.threads is None:
        args.threads = 1 if args.scale == "small" else 0
    if args.jobs is None:
        args.jobs = (os.cpu_count() or 1) if args.threads == 1 else 1
    args.runs = args.runs if args.runs.is_absolute() else (REPO / args.runs)
    steps = set(args.command)
    if "all" in steps:
        steps |= {"run", "tables", "figures", "paper"}
    if "plan" in steps:
        print_plan(args)
    if "run" in steps:
        record = run_experiments(args)
        record["command"] = "rcd-paper " + " ".join(sys.argv[1:] if argv is None else argv)
        ran = sum(e["ran"] + e["failed"] for e in record["experiments"])
        if ran or not (args.out / "tables" / "regeneration.json").is_file():
            write_regeneration(record, args.out / "tables", merge=bool(args.only))
        else:  # everything reused: keep the log of the invocation that last computed runs
            print("[paper] every run was reused; paper/tables/regeneration.md keeps the last run that computed")
        print(f"[paper] runs: {record['wall_s']:.0f} s", flush=True)
    if "tables" in steps:
        make_tables(args)
    if "figures" in steps:
        make_figures(args)
    if "paper" in steps:
        make_paper(args)


if __name__ == "__main__":
    main()
