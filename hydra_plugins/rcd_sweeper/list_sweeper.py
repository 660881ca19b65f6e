"""``hydra/sweeper=rcd_list``: a sweep given as a list of jobs instead of a cartesian product.

Hydra's basic sweeper runs the product of comma-separated values; an experiment plan (the paper's
rows, each with its own strategy and overrides) is a *list* of override sets. This sweeper reads
one JSON list of override strings per line of ``hydra.sweeper.jobs_file`` and hands the jobs to
whatever launcher is configured (``hydra/launcher=basic|joblib|submitit_local|submitit_slurm`` or an
rcd preset), in batches of at most ``max_batch_size`` jobs (the concurrency bound for launchers
that start a whole batch at once). Overrides given on the command line apply to every job.

Unlike the basic sweeper, a failed job does not stop the sweep (``fail_fast: false``): every job
runs, each job's status (and error) is written to ``status_file`` (one JSON object per line, in the
order of ``jobs_file``), and the sweep raises at the end if any job failed.

    python -m rcd.run --multirun hydra/sweeper=rcd_list hydra.sweeper.jobs_file=plan.jsonl \\
        hydra/launcher=rcd_processes hydra.launcher.n_jobs=2
"""
# no `from __future__ import annotations`: Hydra execs plugin modules before they are in sys.modules,
# and dataclasses then cannot resolve string annotations
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class ListSweeperConf:
    _target_: str = "hydra_plugins.rcd_sweeper.list_sweeper.ListSweeper"
    jobs_file: Optional[str] = None  # one JSON list of override strings per line
    max_batch_size: Optional[int] = None  # jobs handed to the launcher at once (null: all)
    status_file: Optional[str] = None  # default: <hydra.sweep.dir>/status.jsonl
    fail_fast: bool = False  # true: stop at the first batch with a failed job (the basic sweeper's way)


ConfigStore.instance().store(group="hydra/sweeper", name="rcd_list", node=ListSweeperConf, provider="rcd")


def read_jobs(path: str) -> List[List[str]]:
    """The jobs of ``path``: one JSON list of override strings per non-empty line."""
    p = Path(path)
    if not p.is_file():
        raise HydraException(f"hydra.sweeper.jobs_file: {p} does not exist: write one JSON list of overrides per line")
    jobs = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except json.JSONDecodeError as e:
            raise HydraException(f"{p}:{n}: not JSON ({e.msg}): write one JSON list of override strings per line") from None
        if not isinstance(job, list) or not all(isinstance(o, str) for o in job):
            raise HydraException(f"{p}:{n}: expected a JSON list of override strings, got {type(job).__name__}")
        jobs.append(job)
    if not jobs:
        raise HydraException(f"{p}: no jobs (one JSON list of overrides per line)")
    return jobs


class ListSweeper(Sweeper):
    def __init__(self, jobs_file: Optional[str] = None, max_batch_size: Optional[int] = None,
                 status_file: Optional[str] = None, fail_fast: bool = False) -> None:
        super().__init__()
        if jobs_file is None:
            raise HydraException("hydra/sweeper=rcd_list needs hydra.sweeper.jobs_file=<file with one JSON list of overrides per line>")
        if max_batch_size is not None and int(max_batch_size) < 1:
            raise HydraException(f"hydra.sweeper.max_batch_size={max_batch_size}: must be >= 1 (or null for all jobs at once)")
        self.jobs_file = jobs_file
        self.max_batch_size = None if max_batch_size is None else int(max_batch_size)
        self.status_file = status_file
        self.fail_fast = bool(fail_fast)
        self.config: Optional[DictConfig] = None
        self.launcher = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        swept = [o.input_line for o in parser.parse_overrides(arguments) if o.is_sweep_override()]
        if swept:
            raise HydraException(f"hydra/sweeper=rcd_list takes its jobs from {self.jobs_file}; "
                                 f"the command line sweeps {swept}: write each combination as a line of the jobs file")
        jobs = [list(arguments) + job for job in read_jobs(self.jobs_file)]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        status = Path(self.status_file) if self.status_file else sweep_dir / "status.jsonl"
        status.parent.mkdir(parents=True, exist_ok=True)
        n = self.max_batch_size or len(jobs)
        returns: List[Sequence[JobReturn]] = []
        records: List[dict] = []
        for start in range(0, len(jobs), n):
            batch = jobs[start:start + n]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=start)
            returns.append(results)
            for i, (job, r) in enumerate(zip(batch, results)):
                ok = r.status == JobStatus.COMPLETED
                records.append({"job": start + i, "overrides": job[len(arguments):], "status": "completed" if ok else "failed",
                                "error": None if ok else f"{type(r._return_value).__name__}: {r._return_value}"})
            tmp = status.with_name(f"{status.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(json.dumps(rec) + "\n" for rec in records))
            os.replace(tmp, status)  # after every batch, so a long sweep can be watched
            failed = [rec for rec in records if rec["status"] == "failed"]
            if failed and self.fail_fast:
                break
        failed = [rec for rec in records if rec["status"] == "failed"]
        log.info(f"rcd_list sweep: {len(records) - len(failed)} of {len(jobs)} job(s) completed; status in {status}")
        if failed:
            first = failed[0]
            raise HydraException(f"{len(failed)} of {len(jobs)} job(s) failed (status in {status}); first: job "
                                 f"{first['job']} {first['overrides']}: {first['error']}")
        return returns
