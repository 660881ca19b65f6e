"""Where rcd keeps things it builds: dequantized models, datastores, runs.

``RCD_CACHE`` (default ``~/.cache/rcd``) holds models and datastores; ``RCD_RUNS``
(default ``./runs``) holds run folders.
"""
from __future__ import annotations

import os
from pathlib import Path


def conf_dir() -> Path:
    """The folder of rcd's Hydra configs: the top-level ``conf/`` of a checkout, installed as the package data
    of ``rcd.conf`` (``[tool.setuptools.package-dir]`` maps it), so a wheel carries it too."""
    here = Path(__file__).resolve().parents[1] / "conf"
    if (here / "config.yaml").is_file() and (Path(__file__).resolve().parents[1] / "pyproject.toml").is_file():
        return here  # a source checkout (editable install or PYTHONPATH)
    found = package_dir("rcd.conf")
    if found is None or not (found / "config.yaml").is_file():
        raise RuntimeError("rcd's configs (package rcd.conf) are missing: reinstall rcd (pip install rcd)")
    return found


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("RCD_CACHE", Path.home() / ".cache" / "rcd")).expanduser()
    p = root.joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def datastore_root(cfg) -> Path:
    """The folder datastores of config ``cfg`` live in: ``cfg.datastore_root`` if set, else
    ``$RCD_CACHE/datastores`` (the same rule for rcd.run, rcd.build and the benchmark)."""
    root = cfg.get("datastore_root") if cfg is not None else None
    return Path(root) if root else cache_dir("datastores")


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
