"""``python scripts/paper.py <command>``: :mod:`rcd.paper.cli` (``rcd-paper``) with this checkout as the project."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rcd.paper.cli import main as _main  # noqa: E402


def main(argv=None) -> None:
    _main(argv, project=REPO)


if __name__ == "__main__":
    main()
