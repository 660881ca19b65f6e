"""Recall@k of dense, BM25 and hybrid chunk retrieval on a QA set with gold passages.

    python scripts/measure_retrieval.py                      # WordNet birth/death-year questions
    python scripts/measure_retrieval.py --sample 500 --seed 0
    python scripts/measure_retrieval.py --corpus mendeleev --questions data/mendeleev_qa.jsonl

The passages are the corpus of ``conf/corpus/<corpus>.yaml`` (one chunk per passage,
``chunking=record``). One hybrid chunk datastore is built (or reused: same fingerprint as
``python -m rcd.build datastore=chunks corpus=<corpus> datastore.chunking=record
datastore.retriever=hybrid``) and searched three ways: its dense part, its BM25 part, and RRF.
A question is a hit at k when its ``gold_id`` is among the doc ids of the top-k passages.
Prints a Markdown table and writes the numbers (with timings) as JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_questions(path: Path, sample: int | None, seed: int) -> list[dict]:
    qs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if sample and sample < len(qs):
        qs = random.Random(seed).sample(qs, sample)
    return qs


def corpus_from_config(name: str):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="build", overrides=[f"corpus={name}", "datastore=chunks"])
    return instantiate(cfg.corpus.datastore)


def recall(store, questions: list[dict], ks: list[int], batch: int = 256) -> dict:
    kmax = max(ks)
    hits = {k: 0 for k in ks}
    t = time.perf_counter()
    for s in range(0, len(questions), batch):
        part = questions[s:s + batch]
        res = store.search([q["question"] for q in part], kmax)
        for q, docs in zip(part, res.doc_ids):
            for k in ks:
                hits[k] += q["gold_id"] in docs[:k]
    sec = time.perf_counter() - t
    n = len(questions)
    return {**{f"recall@{k}": hits[k] / n for k in ks}, "questions": n, "search_seconds": round(sec, 2),
            "ms_per_query": round(1000 * sec / n, 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="wordnet", help="conf/corpus/<name>.yaml (default wordnet)")
    ap.add_argument("--questions", default="data/wordnet_qa.jsonl")
    ap.add_argument("--sample", type=int, default=None, help="random sample of N questions (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--rrf-k", type=int, default=60)
    ap.add_argument("--root", default=None, help="datastore root (default $RCD_CACHE/datastores)")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    args = ap.parse_args(argv)

    from rcd.build import peak_rss_mb
    from rcd.datastore.chunks import ChunkDatastore, build_or_load
    from rcd.paths import cache_dir

    root = Path(args.root) if args.root else cache_dir("datastores")
    questions = load_questions(ROOT / args.questions if not Path(args.questions).is_absolute() else
                               Path(args.questions), args.sample, args.seed)
    corpus = corpus_from_config(args.corpus)
    t = time.perf_counter()
    store = build_or_load(None, corpus, args.corpus, root, chunking="record", retriever="hybrid",
                          encoder=args.encoder, rrf_k=args.rrf_k)
    build_s = time.perf_counter() - t
    out = {"corpus": args.corpus, "passages": len(store), "questions_file": args.questions, "sample": args.sample,
           "seed": args.seed, "encoder": args.encoder, "rrf_k": args.rrf_k, "datastore": str(store.folder),
           "build_or_load_seconds": round(build_s, 2), "manifest_build_seconds": store.manifest["build_seconds"],
           "results": {}}
    for retriever in ("dense", "bm25", "hybrid"):
        s = ChunkDatastore.load(store.folder, retriever=retriever, encoder=args.encoder, rrf_k=args.rrf_k)
        out["results"][retriever] = recall(s, questions, args.k)
    out["peak_rss_mib"] = round(peak_rss_mb(), 1)
    cols = [f"recall@{k}" for k in args.k]
    print(f"\n{args.corpus}: {len(questions)} questions, {len(store)} passages ({args.encoder}, RRF k={args.rrf_k})\n")
    print("| retriever | " + " | ".join(cols) + " | ms/query |")
    print("|---|" + "---|" * (len(cols) + 1))
    for r, res in out["results"].items():
        print(f"| {r} | " + " | ".join(f"{res[c]:.3f}" for c in cols) + f" | {res['ms_per_query']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
