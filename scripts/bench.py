"""Cost of retrieval next to the plain model, measured in one process and one run.

    python scripts/bench.py                                   # defaults: none + per_token, 1 index
    python scripts/bench.py --index Flat "IVF4096,SQfp16" "IVF4096,PQ64+rerank" --nprobe 8 16
    python scripts/bench.py --datastore-tokens 1000000 --out paper/bench/bench_cpu.json
    python scripts/bench.py --synthetic 1000000 --index Flat "IVF4096,SQfp16"   # search-only scaling

For ``none`` and each kNN-LM index setting it measures decode tokens/s at batch 1 and 8 (greedy,
fixed number of new tokens), time to first token, held-out perplexity (and its difference to
exact ``Flat`` search over the same datastore), and peak RSS; plus the datastore build
throughput against a plain forward pass over the same tokens. Every figure is also printed as a
ratio to ``none`` measured in this run. ``--synthetic N`` times search alone on N random keys
(the output says so). Results go to a JSON file the paper scripts read.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rcd.control.knn import KNNInterpolation  # noqa: E402
from rcd.corpus import shakespeare  # noqa: E402
from rcd.datastore.tokens import TokenDatastore, build_or_load  # noqa: E402
from rcd.models import load_model  # noqa: E402
from rcd.paths import cache_dir  # noqa: E402
from rcd.tasks import generate as gen  # noqa: E402
from rcd.tasks.lm import heldout_ids  # noqa: E402
from rcd.tasks.perplexity import score  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name(lm) -> str:
    if lm.device.type == "cuda":
        return torch.cuda.get_device_name(lm.device)
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()})"


def decode(lm, processor, batch: int, new_tokens: int, repeats: int) -> dict:
    prompts = [f"{i}. " + "MACBETH. If it were done when 'tis done, then 'twere well\nIt were done quickly. "
               for i in range(batch)]
    best = None
    for _ in range(repeats):
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        r = gen.generate(lm, prompts, processor, max_new_tokens=new_tokens)
        if best is None or r["tokens_per_second"] > best["tokens_per_second"]:
            best = r
    return {"tokens_per_second": best["tokens_per_second"], "time_to_first_token": best["time_to_first_token"]}


def plain_forward_tps(lm, ids: torch.Tensor, window: int = 512, batch: int = 4) -> float:
    n = (ids.numel() // window) * window
    x = ids[:n].view(-1, window)
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, x.shape[0], batch):
            lm.model(input_ids=x[s:s + batch].to(lm.device), use_cache=False)
    return n / (time.perf_counter() - t)


def parse_index(spec: str) -> tuple[str, bool]:
    return (spec[: -len("+rerank")], True) if spec.endswith("+rerank") else (spec, False)


def synthetic_search(n: int, d: int, factories: list[str], nprobes: list[int], k: int, batches: list[int]) -> list:
    from rcd.datastore.index import build_index, set_search_params

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((n, d), dtype=np.float32)
    rows = []
    for spec in factories:
        fac, _ = parse_index(spec)
        t = time.perf_counter()
        index = build_index(keys, fac, "l2")
        build_s = time.perf_counter() - t
        for nprobe in (nprobes if "IVF" in fac else [None]):
            set_search_params(index, nprobe=nprobe)
            for b in batches:
                q = rng.standard_normal((b, d), dtype=np.float32)
                index.search(q, k)
                t = time.perf_counter()
                reps = 20
                for _ in range(reps):
                    index.search(q, k)
                ms = (time.perf_counter() - t) / reps * 1000
                rows.append({"synthetic_keys": n, "dim": d, "index": fac, "nprobe": nprobe, "batch": b, "k": k,
                             "search_ms": ms, "build_s": build_s})
                print(f"  synthetic N={n:,} d={d} {fac:<18} nprobe={nprobe} batch={b}: {ms:.2f} ms/search (k={k})")
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--datastore-tokens", type=int, default=100_000, help="token datastore entries (0: whole corpus)")
    ap.add_argument("--index", nargs="+", default=["Flat"], help="index_factory strings; suffix +rerank for exact re-scoring")
    ap.add_argument("--nprobe", nargs="+", type=int, default=[16])
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--build-tokens", type=int, default=8192, help="tokens for the build-throughput measurement")
    ap.add_argument("--synthetic", type=int, default=0, help="also time search alone on N random keys")
    ap.add_argument("--out", default=str(ROOT / "paper" / "bench" / "bench.json"))
    args = ap.parse_args(argv)

    t_all = time.perf_counter()
    lm = load_model(args.model, args.device)
    torch.manual_seed(0)
    out = {"device": device_name(lm), "model": args.model, "k": args.k, "new_tokens": args.new_tokens, "rows": []}
    print(f"[bench] device: {out['device']}")

    # ---- plain model
    base = {"strategy": "none"}
    for b in args.batch:
        r = decode(lm, None, b, args.new_tokens, args.repeats)
        base[f"tps_b{b}"], base[f"ttft_b{b}"] = r["tokens_per_second"], r["time_to_first_token"]
    held = heldout_ids(lm, shakespeare(include=["macbeth"]), args.eval_tokens)
    ppl_none = score(lm, held).summary()["perplexity_none"]
    base.update({"perplexity": ppl_none, "peak_rss_mb": peak_rss_mb()})
    out["rows"].append(base)

    # ---- build throughput vs a plain forward over the same tokens
    corpus = shakespeare(exclude=["macbeth"])
    build_text = corpus.select(range(1))
    ids = lm.tokenizer(build_text["text"][0], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    ids = ids[: args.build_tokens + 1]
    fwd_tps = plain_forward_tps(lm, ids)
    tmp_root = cache_dir("bench-build") / str(os.getpid())
    t = time.perf_counter()
    build_or_load(lm, build_text, "bench-build", tmp_root, max_tokens=args.build_tokens, progress=False)
    build_tps = args.build_tokens / (time.perf_counter() - t)
    import shutil
    shutil.rmtree(tmp_root, ignore_errors=True)
    out["build"] = {"tokens": args.build_tokens, "build_tokens_per_second": build_tps,
                    "plain_forward_tokens_per_second": fwd_tps, "ratio": build_tps / fwd_tps}
    print(f"[bench] build {build_tps:.0f} tok/s vs plain forward {fwd_tps:.0f} tok/s: {build_tps / fwd_tps:.2f}x")

    # ---- kNN-LM at each index setting over one datastore
    ds_root = cache_dir("datastores")
    exact_ppl = None
    for spec in args.index:
        fac, rerank = parse_index(spec)
        for nprobe in (args.nprobe if "IVF" in fac else [None]):
            t = time.perf_counter()
            ds = build_or_load(lm, corpus, "shakespeare", ds_root, max_tokens=args.datastore_tokens or None,
                               index_factory=fac, nprobe=nprobe or 1, rerank=rerank, progress=True)
            load_s = time.perf_counter() - t
            ctl = KNNInterpolation(k=args.k, lmbda=0.1, temperature=100.0, datastore=ds)
            row = {"strategy": "per_token", "index": fac, "rerank": rerank, "nprobe": nprobe, "entries": len(ds),
                   "index_load_or_build_s": load_s}
            res = score(lm, held, ctl).summary()
            row["perplexity"] = res["perplexity"]
            if fac == "Flat" and not rerank:
                exact_ppl = res["perplexity"]
            for b in args.batch:
                r = decode(lm, ctl, b, args.new_tokens, args.repeats)
                row[f"tps_b{b}"], row[f"ttft_b{b}"] = r["tokens_per_second"], r["time_to_first_token"]
                row[f"ratio_b{b}"] = r["tokens_per_second"] / base[f"tps_b{b}"]
            row["peak_rss_mb"] = peak_rss_mb()
            out["rows"].append(row)
            del ds, ctl
    for row in out["rows"]:
        if row["strategy"] == "per_token" and exact_ppl:
            row["ppl_vs_exact"] = row["perplexity"] / exact_ppl - 1
    if args.synthetic:
        out["synthetic_search"] = synthetic_search(args.synthetic, lm.hidden_size, args.index, args.nprobe, args.k,
                                                   args.batch)
    out["wall_s"] = time.perf_counter() - t_all

    # ---- print
    cols = ["strategy", "index", "nprobe"] + [f"tps_b{b}" for b in args.batch] + [f"ratio_b{b}" for b in args.batch] + \
           ["ttft_b1", "perplexity", "ppl_vs_exact", "peak_rss_mb"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in out["rows"]:
        cells = []
        for c in cols:
            v = row.get(c, "–")
            if isinstance(v, float):
                v = f"{v:+.2%}" if c == "ppl_vs_exact" else f"{v:.3f}" if c.startswith(("ttft", "ratio")) else f"{v:.2f}"
            cells.append(str(v) if v is not None else "–")
        print("| " + " | ".join(cells) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"[bench] wrote {args.out} in {out['wall_s']:.0f}s")
    return out


if __name__ == "__main__":
    main()
