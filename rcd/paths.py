"""Where rcd keeps things it builds: dequantized models, datastores, runs.

``RCD_CACHE`` (default ``~/.cache/rcd``) holds models and datastores; ``RCD_RUNS``
(default ``./runs``) holds run folders.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("RCD_CACHE", Path.home() / ".cache" / "rcd")).expanduser()
    p = root.joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def runs_dir() -> Path:
    p = Path(os.environ.get("RCD_RUNS", "runs")).expanduser()
    p.mkdir(parents=True, exist_ok=True)
    return p


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])
