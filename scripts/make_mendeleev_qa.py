#!/usr/bin/env python
"""Write the chemical-element passage store and QA set from the ``mendeleev`` package.

    python scripts/make_mendeleev_qa.py [--out data/]

Outputs ``<out>/mendeleev_passages.jsonl`` (one passage per element, id ``el-<Z>``) and
``<out>/mendeleev_qa.jsonl`` (atomic number, symbol, element from symbol / atomic number,
period, group, year of discovery when known).  Deterministic: sorted by atomic number.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rcd.data_qa import build_mendeleev, write_jsonl  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        passages, questions = build_mendeleev()
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n_p = write_jsonl(args.out / "mendeleev_passages.jsonl", passages)
    n_q = write_jsonl(args.out / "mendeleev_qa.jsonl", questions)
    kinds = Counter(q["kind"] for q in questions)
    print(f"elements/passages: {n_p} -> {args.out / 'mendeleev_passages.jsonl'}")
    print(f"questions: {n_q} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}) "
          f"-> {args.out / 'mendeleev_qa.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
