"""``python -m rcd.build datastore=<unit> corpus=<corpus>``: build (or find) one datastore and report its cost.

The datastore is built by the ``_target_`` of ``conf/datastore/<unit>.yaml`` through
:func:`rcd.strategy.call_target` — the same ``build_or_load`` call ``rcd.run`` makes — so the
folder (named by its fingerprint) is the one a run will reuse. The LM is loaded only when the
unit needs it (tokens, latent, or chunks/tags with ``chunking=tokens``).

Sharding: ``datastore.shard=i datastore.num_shards=n`` builds shard i of n (contiguous corpus
rows, see :mod:`rcd.datastore.shards`) into its own folder; ``+merge=true datastore.num_shards=n``
merges the n finished shards into the folder of the unsharded datastore. (The token unit's
config has no shard keys: add them with ``+datastore.shard=i +datastore.num_shards=n``.)
``ray.enabled=true datastore.num_shards=n`` runs the n shards as Ray tasks and merges them
(:mod:`rcd.build_ray`).

Prints a summary: entries, bytes on disk, seconds, index type, peak resident memory of this
process (``resource.getrusage``, includes the model and encoder), and whether the datastore was
built or reused.

``--verify`` (or ``verify=true``) re-reads every byte of the datastore's files against the
SHA-1 checksums in its manifest (every load checks sizes and sampled blocks only) and refuses a
datastore whose files changed after the build.
"""
from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rcd.paths import conf_dir

log = logging.getLogger("rcd.build")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


class AnonPeak:
    """Peak anonymous resident memory (heap, tensors, FAISS index; not memory-mapped file pages) of
    this process, sampled from ``/proc/self/status`` (RssAnon) every ``interval`` seconds. ``peak``
    is None where /proc is unavailable (macOS). ru_maxrss also counts pages of memory-mapped files
    (keys being written or read), which the kernel can drop at any time."""

    def __init__(self, interval: float = 0.1):
        import threading

        self.interval, self.peak = interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def sample() -> Optional[float]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            v = self.sample()
            if v is not None:
                self.peak = v if self.peak is None else max(self.peak, v)
            self._stop.wait(self.interval)

    def __enter__(self) -> "AnonPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        v = self.sample()
        if v is not None:
            self.peak = v if self.peak is None else max(self.peak, v)


def _existing(root: Path) -> set[str]:
    return {p.name for p in Path(root).iterdir()} if Path(root).is_dir() else set()


def build(cfg: DictConfig) -> dict[str, Any]:
    """Build (or reuse) ``cfg.datastore`` for ``cfg.corpus`` and return the summary dict; with
    ``ray.enabled=true`` its shards run as Ray tasks and are merged (:mod:`rcd.build_ray`)."""
    with AnonPeak() as mem:
        if (cfg.get("ray") or {}).get("enabled"):
            from rcd import build_ray
            from rcd.validate import check_config

            check_config(cfg, task=False)  # before Ray, any model or datastore starts
            summary = build_ray.build_on_ray(cfg, _build)  # checks the Ray settings first
        else:
            summary = _build(cfg)
    summary["peak_anon_mib"] = None if mem.peak is None else round(mem.peak, 1)
    return summary


def _build(cfg: DictConfig, map_fn=None) -> dict[str, Any]:
    from rcd.datastore import registry
    from rcd.datastore.base import build_lock
    from rcd.datastore.shards import check_shard, shard_label
    from rcd.paths import datastore_root
    from rcd.validate import check_config

    node = cfg.get("datastore")
    if node is None or not node.get("_target_"):
        raise ValueError("no datastore chosen: add datastore=<tokens|chunks|tags|latent>")
    check_config(cfg, task=False)  # before any model loads
    unit = str(node.get("unit"))
    params = OmegaConf.to_container(node, resolve=True)
    merge = bool(cfg.get("merge", False))
    if merge and not params.get("num_shards"):
        raise ValueError("+merge=true needs datastore.num_shards=<n> (the number of shards that were built)")
    t0 = time.perf_counter()
    lm = None
    if registry.needs_model(params):
        from rcd.models import load_model

        lm = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    t_model = time.perf_counter() - t0
    corpus_ds = instantiate(cfg.corpus.datastore)
    corpus_name = str(cfg.corpus.name)
    root = datastore_root(cfg)
    sh = None if merge else check_shard(params.get("shard"), params.get("num_shards"))
    # another build or run of this unit and corpus (shard) goes first; shards of one corpus build at once
    with build_lock(root, unit, shard_label(corpus_name, sh)):
        before = _existing(root)
        t1 = time.perf_counter()
        store = _build_store(cfg, node, params, lm, corpus_ds, corpus_name, root, merge, map_fn)
    seconds = time.perf_counter() - t1
    info = store.describe()
    verified = None
    if cfg.get("verify"):
        from rcd.datastore.base import read_manifest, verify_files

        tv = time.perf_counter()
        nbytes = verify_files(Path(info["folder"]), read_manifest(Path(info["folder"])), full=True)
        verified = {"bytes": nbytes, "seconds": round(time.perf_counter() - tv, 2)}
    summary = {
        "unit": unit, "corpus": corpus_name, "corpus_rows": len(corpus_ds),
        "model": lm.name if lm is not None else None,
        "status": "reused" if Path(info["folder"]).name in before else ("merged" if merge else "built"),
        "entries": info["size"], "bytes": info["bytes"], "mib": round(info["bytes"] / 2 ** 20, 2),
        "seconds": round(seconds, 2), "model_load_seconds": round(t_model, 2), "index": info.get("index"),
        "peak_rss_mib": round(peak_rss_mb(), 1), "folder": info["folder"],
        "shard": params.get("shard") if not merge else None, "num_shards": params.get("num_shards"),
        "describe": info, "verified": verified,
    }
    return summary


def _build_store(cfg, node, params: dict, lm, corpus_ds, corpus_name: str, root: Path, merge: bool,
                 map_fn=None):
    from rcd.datastore import registry
    from rcd.strategy import call_target

    progress = bool(cfg.get("progress", True))
    if merge:
        merge_shards = registry.unit_of(params).merge_shards
        params.pop("_target_")
        if map_fn is not None:
            params["map_fn"] = map_fn  # the token merge fills an on-disk index's blocks with it
        return merge_shards(lm, corpus_ds, corpus_name, root, progress=progress, **params)
    return call_target(node, lm=lm, corpus_ds=corpus_ds, corpus_name=corpus_name, root=root, progress=progress)


def format_summary(s: dict[str, Any]) -> str:
    rows = [("datastore", f"{s['unit']} ({s['status']})"), ("corpus", f"{s['corpus']} ({s['corpus_rows']} rows)"),
            ("entries", f"{s['entries']:,}"), ("size", f"{s['mib']:,} MiB ({s['bytes']:,} bytes)"),
            ("seconds", f"{s['seconds']} (+{s['model_load_seconds']} model load)"), ("index", str(s["index"])),
            ("peak RSS", f"{s['peak_rss_mib']:,} MiB (incl. memory-mapped file pages)"),
            ("peak anon", "n/a" if s.get("peak_anon_mib") is None else f"{s['peak_anon_mib']:,} MiB (heap: model, batch, index)"),
            ("folder", s["folder"])]
    if s.get("verified"):
        rows.append(("verified", f"every byte ({s['verified']['bytes']:,}) matches the manifest checksums "
                                 f"({s['verified']['seconds']} s)"))
    if s.get("num_shards"):
        rows.insert(1, ("shard", "merged" if s["shard"] is None else f"{s['shard']} of {s['num_shards']}"))
    if s.get("ray"):
        r = s["ray"]
        rows.append(("ray", f"{len(s['shards'])} shard tasks on {r['address']} Ray ({r['cluster_cpus']:g} CPUs, "
                            f"{r['cpus_per_shard']:g} per shard): shards {r['shards_seconds']} s, "
                            f"wall {r['wall_seconds']} s"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"[rcd.build] {k.ljust(w)}  {v}" for k, v in rows)


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="build")
def main(cfg: DictConfig) -> None:
    from hydra.errors import InstantiationException

    from rcd.errors import EXIT_CODE, RcdError
    from rcd.run import report_error, setup_logging

    setup_logging()

    try:
        summary = build(cfg)
    except (RcdError, ValueError, RuntimeError, OSError, InstantiationException) as e:  # user-facing errors
        report_error(e)
        sys.exit(EXIT_CODE)
    print(format_summary(summary))
    print("[rcd.build] json " + json.dumps({k: v for k, v in summary.items() if k != "describe"}, default=str))
    if cfg.get("summary_json"):
        Path(cfg.summary_json).write_text(json.dumps(summary, indent=2, default=str))


def _flags(argv: list[str]) -> list[str]:
    """``--verify`` is ``verify=true`` (Hydra takes no flags of its own for it)."""
    return ["verify=true" if a == "--verify" else a for a in argv]


def cli() -> None:
    """``rcd-build`` (console script) = ``python -m rcd.build``."""
    from rcd.preflight import check_argv

    sys.argv = [sys.argv[0]] + _flags(sys.argv[1:])
    check_argv(sys.argv[1:], config_name="build")
    main()


if __name__ == "__main__":
    cli()
