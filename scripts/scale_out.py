"""Scale-out figures: a Ray-sharded token build against the unsharded build, and a synthetic on-disk IVF index.

    python scripts/scale_out.py ray-build [--works hamlet othello lear tempest] [--max-chars 60000]
    python scripts/scale_out.py ondisk-synthetic [--keys 10000000] [--dim 576]
    python scripts/scale_out.py launchers [--eval-tokens 512]

``launchers``: the same four runs (the plain model and kNN-LM with k = 16, 64, 256 on held-out
*Macbeth*, the default 100k-entry token datastore, no generation) as one ``--multirun`` through
rcd's list sweeper on three launchers, each into its own runs folder: basic (one after another),
local processes (``hydra/launcher=rcd_processes``, 2 workers of 1 thread) and submitit's local
executor (``rcd_submitit_local``, 2 at once); every computed value of every run
(:func:`rcd.paper.stats.computed_values`) compared across them, and each sweep's wall time.

``ray-build``: builds the SmolLM2 token datastore of the chosen Shakespeare works twice, in fresh
datastore folders: ``rcd.build`` unsharded (one process, torch's threads) and ``rcd.build
ray.enabled=true`` with one shard per 2 works on a local Ray of 2 CPUs (1 per shard), both with
``index_factory=IVF<lists>,SQfp16``; the Ray build's index is filled per shard and merged on disk.
Records each build's wall time (the ``rcd.build`` subprocess, model load included) and compares keys,
values and the neighbours of 512 stored keys used as queries (ids and distances, k=256, nprobe=8).

``ondisk-synthetic``: N random standard-normal keys (synthetic: not a real datastore; as the bench's
``--synthetic``), d=576 like SmolLM2's keys, indexed with IVF4096,SQfp16: trained on 100k keys,
filled in blocks of 1M generated keys (never stored) and merged with ``merge_ondisk`` into
memory-mapped lists; then searched at the bench settings (k=256, nprobe 8 and 32, batch 1 and 8)
in a fresh process, recording ms per search and the process's resident memory (RssAnon: heap;
RssFile: mapped pages of the lists, which the kernel can drop) next to the index's size on disk.

Both write into ``paper/bench/scale_out.json`` (``--out``), each under its own key.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _save(out: Path, key: str, value) -> None:
    data = json.loads(out.read_text()) if out.is_file() else {}
    data[key] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")


def _run(cmd: list[str]) -> float:
    """Run ``cmd`` in the checkout; its wall seconds (stops the script with the output's tail on failure)."""
    print("$ " + " ".join(cmd), flush=True)
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stdout[-3000:] + p.stderr[-3000:])
    return time.perf_counter() - t


def _status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:", "VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            out[k] = round(int(v.split()[0]) / 1024, 1)
    return out


# ------------------------------------------------------------------------------------------ ray build
def ray_build(args) -> dict:
    work = Path(args.work) / "ray-build"  # each subcommand owns one subfolder of --work
    shutil.rmtree(work, ignore_errors=True)
    works = "[" + ",".join(args.works) + "]"
    common = ["datastore=tokens", "corpus=shakespeare", f"+corpus.datastore.include={works}",
              f"+corpus.datastore.max_chars={args.max_chars}", "datastore.max_tokens=null",
              f"datastore.index_factory='IVF{args.lists},SQfp16'", "datastore.nprobe=8", "progress=false"]
    runs = {}
    for name, extra in (("unsharded", []),
                        ("ray", ["datastore.index_ondisk=true", f"+datastore.num_shards={args.shards}", "ray.enabled=true",
                                 f"ray.num_cpus={args.shards}", "ray.cpus_per_shard=1"])):
        summary = work / f"{name}.json"
        wall = _run([sys.executable, "-m", "rcd.build"] + common + extra + [f"datastore_root={work / name}",
                                                                            f"summary_json={summary}"])
        s = json.loads(summary.read_text())
        runs[name] = {"wall_s": round(wall, 1), "build_s": s["seconds"], "entries": s["entries"], "folder": s["folder"],
                      "status": s["status"], "index": s.get("describe", {}).get("index"),
                      "index_ondisk": s.get("describe", {}).get("index_ondisk"), "ray": s.get("ray"),
                      "shard_seconds": [x["seconds"] for x in s.get("shards", [])],
                      "shard_entries": [x["entries"] for x in s.get("shards", [])],
                      "peak_anon_mib": s.get("peak_anon_mib")}
        print(f"[scale_out] {name}: {s['entries']:,} entries, {wall:.1f} s wall", flush=True)
    from rcd.datastore import registry
    from rcd.models import load_model
    import torch

    lm = load_model("smollm2", "cpu", "float32")
    fac = f"IVF{args.lists},SQfp16"
    from rcd.datastore.index import IndexSpec

    spec = IndexSpec(factory=fac, metric="l2", nprobe=8)
    a = registry.open_datastore(Path(runs["unsharded"]["folder"]), lm, index=spec)
    b = registry.open_datastore(Path(runs["ray"]["folder"]), lm, index=dataclasses.replace(spec, ondisk=True))
    q = torch.from_numpy(np.asarray(a.keys[:: max(1, len(a) // 512)][:512], dtype=np.float32))
    na, nb = a.search(q, 256), b.search(q, 256)
    cmp = {"keys_equal": bool(np.array_equal(np.asarray(a.keys), np.asarray(b.keys))),
           "values_equal": bool(np.array_equal(a.values_np, b.values_np)),
           "queries": int(q.shape[0]), "k": 256, "nprobe": 8,
           "neighbour_ids_equal": float((na.ids == nb.ids).float().mean()),
           "distances_max_abs_diff": float((na.scores - nb.scores).abs().max())}
    rec = {"works": args.works, "max_chars": args.max_chars, "shards": args.shards, "index": fac, "runs": runs,
           "compare": cmp, "machine": f"{os.cpu_count()} cores"}
    print(json.dumps(rec, indent=1))
    return rec


# ------------------------------------------------------------------------------------------ launchers
LAUNCHERS = {
    "basic": [],
    "processes (joblib, 2 workers)": ["hydra/launcher=rcd_processes", "hydra.launcher.n_jobs=2"],
    "submitit local (2 at once)": ["hydra/launcher=rcd_submitit_local", "hydra.sweeper.max_batch_size=2"],
}


def launchers(args) -> dict:
    from rcd.paper.stats import computed_values

    work = Path(args.work) / "launchers"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    jobs = [["+strategy=none"]] + [["+strategy=per_token", f"strategy.control.k={k}"] for k in (16, 64, 256)]
    (work / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    common = [f"task.eval_tokens={args.eval_tokens}", "task.generate=false", "progress=false", "threads=1"]
    rec: dict = {"jobs": jobs, "common": common, "sweeps": {}}
    values = {}
    for i, (name, launcher) in enumerate(LAUNCHERS.items()):
        wall = _run([sys.executable, "-m", "rcd.run", "--multirun", "hydra/sweeper=rcd_list",
                     f"hydra.sweeper.jobs_file={work / 'jobs.jsonl'}", f"hydra.sweep.dir={work / f'sweep{i}'}",
                     f"runs_root={work / f'runs{i}'}"] + launcher + common)
        runs = {f.parent.name: computed_values(json.loads(f.read_text()))
                for f in sorted((work / f"runs{i}").glob("*/results.json"))}
        values[name] = runs
        rec["sweeps"][name] = {"wall_s": round(wall, 1), "runs": len(runs), "perplexity": {
            k: v.get("metrics.perplexity.perplexity", v.get("metrics.perplexity.perplexity_none")) for k, v in runs.items()}}
        print(f"[scale_out] {name}: {len(runs)} runs, {wall:.0f} s", flush=True)
    first = next(iter(values.values()))
    rec["identical"] = all(v == first for v in values.values())
    rec["values_compared_per_launcher"] = sum(len(v) for v in first.values())
    print(json.dumps(rec, indent=1))
    return rec


# ------------------------------------------------------------------------------------------ synthetic
class Gaussian:
    """Rows [s, e) of a fixed random matrix, generated per block of ``block`` rows from its block number."""

    def __init__(self, dim: int, block: int = 1_000_000):
        self.dim, self.block = dim, block
        self._cache = (None, None)  # (block number, its rows): consecutive calls read the same block

    def __call__(self, s: int, e: int) -> np.ndarray:
        out = []
        while s < e:
            b = s // self.block
            hi = min(e, (b + 1) * self.block)
            if self._cache[0] != b:
                rng = np.random.default_rng(1000 + b)
                self._cache = (b, rng.standard_normal((self.block, self.dim), dtype=np.float32))
            rows = self._cache[1]
            out.append(rows[s - b * self.block: hi - b * self.block])
            s = hi
        return np.concatenate(out)


def ondisk_synthetic(args) -> dict:
    import faiss

    from rcd.datastore import ondisk

    work = Path(args.work) / "synthetic"
    path = work / "index" / f"IVF4096_SQfp16-l2-ondisk-{args.keys}x{args.dim}.faiss"  # reused only for the same keys and dim
    rec = {"synthetic": True, "keys": args.keys, "dim": args.dim, "index": "IVF4096,SQfp16"}
    if not path.exists() or not ondisk.intact(path):
        shutil.rmtree(work, ignore_errors=True)
        path.parent.mkdir(parents=True)
        t = time.perf_counter()
        rng = np.random.default_rng(0)
        index = faiss.index_factory(args.dim, "IVF4096,SQfp16", faiss.METRIC_L2)
        index.train(rng.standard_normal((100_000, args.dim), dtype=np.float32))
        rec["train_s"] = round(time.perf_counter() - t, 1)
        blocks = ondisk.row_blocks(args.keys, None, 1_000_000)
        gen = Gaussian(args.dim)
        t = time.perf_counter()
        ondisk.build(gen, index, path, blocks)
        rec["fill_and_merge_s"] = round(time.perf_counter() - t, 1)
        rec["build_anon_mib"] = _status().get("RssAnon")
        print(f"[scale_out] built {path} in {rec['train_s'] + rec['fill_and_merge_s']:.0f} s", flush=True)
    # search in a fresh process: its memory is the index's, not the build's
    code = f"""
import json, sys, time, numpy as np
sys.path.insert(0, {str(ROOT)!r})
from scripts.scale_out import _status
from rcd.datastore import ondisk
from rcd.datastore.index import set_search_params
before = _status()
index = ondisk.read(__import__('pathlib').Path({str(path)!r}))
opened = _status()
rng = np.random.default_rng(7)
rows = []
for nprobe in (8, 32):
    set_search_params(index, nprobe=nprobe)
    for b in (1, 8):
        q = rng.standard_normal((b, {args.dim}), dtype=np.float32)
        index.search(q, 256)
        reps = 50
        t = time.perf_counter()
        for _ in range(reps):
            q = rng.standard_normal((b, {args.dim}), dtype=np.float32)
            index.search(q, 256)
        rows.append({{"nprobe": nprobe, "batch": b, "k": 256, "search_ms": (time.perf_counter() - t) / reps * 1000}})
import faiss
ivf = faiss.extract_index_ivf(index)
sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)])
print(json.dumps({{"before_open": before, "after_open": opened, "after_search": _status(), "rows": rows,
                  "ntotal": int(index.ntotal), "imbalance_factor": float(ivf.invlists.imbalance_factor()),
                  "empty_lists": int((sizes == 0).sum()), "largest_list": int(sizes.max())}}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    res = json.loads(p.stdout.strip().splitlines()[-1])
    rec.update(res)
    rec["index_bytes"] = path.stat().st_size
    rec["ivfdata_bytes"] = path.with_suffix(".ivfdata").stat().st_size
    rec["note"] = ("random standard-normal keys (synthetic), as the bench's --synthetic: k-means on isotropic 576-d "
                   "noise leaves many lists empty and a few huge (imbalance_factor), so a probe scans more codes than "
                   "on real keys; searched right after the build (lists partly in the page cache); RssFile counts "
                   "mapped list pages the kernel can drop")
    print(json.dumps(rec, indent=1))
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("ray-build")
    r.add_argument("--works", nargs="+", default=["hamlet", "othello", "lear", "tempest"])
    r.add_argument("--max-chars", type=int, default=60000)
    r.add_argument("--shards", type=int, default=2)
    r.add_argument("--lists", type=int, default=256)
    s = sub.add_parser("ondisk-synthetic")
    s.add_argument("--keys", type=int, default=10_000_000)
    s.add_argument("--dim", type=int, default=576)
    la = sub.add_parser("launchers")
    la.add_argument("--eval-tokens", type=int, default=512)
    for p in (r, s, la):
        p.add_argument("--work", default=os.environ.get("RCD_SCALE_WORK", "/tmp/rcd-scale-out"))
        p.add_argument("--out", type=Path, default=ROOT / "paper" / "bench" / "scale_out.json")
    args = ap.parse_args(argv)
    if args.cmd == "ray-build":
        _save(args.out, "ray_build", ray_build(args))
    elif args.cmd == "launchers":
        _save(args.out, "launchers", launchers(args))
    else:
        _save(args.out, "ondisk_synthetic", ondisk_synthetic(args))


if __name__ == "__main__":
    main()
