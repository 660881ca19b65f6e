#!/usr/bin/env python
"""Write the WordNet passage store and the people born-in / died-in QA set.

    python scripts/make_wordnet_qa.py [--wordnet-dir /usr/share/wordnet] [--out data/]
                                      [--pos noun[,verb,adj,adv]]

Outputs ``<out>/wordnet_passages.jsonl`` (one passage per synset, id ``wn-<offset>`` for nouns,
``wn-v-/wn-a-/wn-r-<offset>`` for other parts of speech), ``<out>/wordnet_qa.jsonl`` (two
questions per person with a life span in the gloss) and ``<out>/wordnet_people.jsonl`` (the
gold passages only, one per person: a small corpus for datastores whose size grows with the
tokens they store, e.g. latent KV caches at ~23 kB per token for SmolLM2).  Deterministic: sorted by offset.
Needs the Debian package wordnet-base (apt-get install wordnet-base).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rcd.data_qa import DEFAULT_WORDNET_DIR, POS_FILES, build_wordnet, write_jsonl  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wordnet-dir", type=Path, default=DEFAULT_WORDNET_DIR,
                    help="folder holding data.noun etc. (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: %(default)s)")
    ap.add_argument("--pos", default="noun",
                    help=f"comma-separated parts of speech for passages, from {','.join(POS_FILES)} "
                         "(nouns are always included; default: %(default)s)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    try:
        passages, questions, n_people = build_wordnet(args.wordnet_dir, [p.strip() for p in args.pos.split(",") if p.strip()])
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n_p = write_jsonl(args.out / "wordnet_passages.jsonl", passages)
    n_q = write_jsonl(args.out / "wordnet_qa.jsonl", questions)
    gold = {q["gold_id"] for q in questions}
    n_g = write_jsonl(args.out / "wordnet_people.jsonl", [p for p in passages if p["id"] in gold])
    kinds = Counter(q["kind"] for q in questions)
    print(f"passages: {n_p} -> {args.out / 'wordnet_passages.jsonl'}")
    print(f"people: {n_people}, questions: {n_q} (born {kinds['born']}, died {kinds['died']}) "
          f"-> {args.out / 'wordnet_qa.jsonl'}")
    print(f"gold passages: {n_g} -> {args.out / 'wordnet_people.jsonl'}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
