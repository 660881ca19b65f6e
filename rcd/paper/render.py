"""Paper assembly: ``<!-- include path -->`` lines and ``{{key}}`` values substituted into the source."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional


from rcd.paper.experiments import MISSING


_INCLUDE = re.compile(r"^<!--[ \t]*include[ \t]+(\S+)[ \t]*-->[ \t]*$", re.M)
_VALUE = re.compile(r"\{\{\s*([A-Za-z0-9_.\-]+)\s*\}\}")


def render_paper(source: str, base: Path, values: dict[str, str], missing: Optional[list] = None) -> str:
    """Replace ``<!-- include path -->`` lines by the file (relative to ``base``) and ``{{key}}`` by values.

    A missing include or value becomes "–" and is appended to ``missing`` (if given).
    """
    def inc(m):
        p = base / m.group(1)
        if not p.is_file():
            if missing is not None:
                missing.append(m.group(1))
            return f"*({m.group(1)}: not generated yet)*"
        return p.read_text().rstrip("\n")

    def val(m):
        if m.group(1) in values:
            return values[m.group(1)]
        if missing is not None:
            missing.append(m.group(1))
        return MISSING

    return _VALUE.sub(val, _INCLUDE.sub(inc, source))
