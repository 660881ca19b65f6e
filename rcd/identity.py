"""What a run or a datastore *is*, by content: fingerprints of files, models and the rcd code.

Run folders and datastore folders are named by hashes that include these fingerprints, never the
paths the inputs were read from, so an input edited in place (a corpus, a held-out or QA file,
new weights saved over old ones) gives a new hash and is recomputed, and the same content read
from another place (another ``RCD_CACHE``, a copied data file) is reused.

File fingerprint (:func:`file_fingerprint`): SHA-1 of the whole file up to
``RCD_FULL_HASH_BYTES`` (default 256 MiB); above that, of the size and 64 blocks of 64 KiB at
evenly spaced offsets, the first and the last included ("sampled": an edit that keeps the size
and touches none of those blocks goes unseen; say ``RCD_FULL_HASH_BYTES=<larger>`` to hash it
whole). Results are cached in ``$RCD_CACHE/fingerprints.json`` by (path, size, mtime, inode), so
an unchanged file is read once.

Model fingerprint (:func:`model_fingerprint`): an embedded alias hashes its GGUF file; a local
folder hashes every file in it (config, weights, tokenizer); a hub id hashes its snapshot in the
local Hugging Face cache when there is one, else records ``hub:<id>`` (content unknown until it is
downloaded). A model that exists only in memory hashes its tensors (:func:`tensors_fingerprint`).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

BLOCK = 64 * 1024
BLOCKS = 64


def full_hash_limit() -> int:
    return int(os.environ.get("RCD_FULL_HASH_BYTES", 256 * 2 ** 20))


def _cache_file() -> Path:
    from rcd.paths import cache_dir

    return cache_dir() / "fingerprints.json"


_MEMO: dict[str, dict] = {}


def _load_cache() -> dict:
    if not _MEMO:
        try:
            _MEMO.update(json.loads(_cache_file().read_text()))
        except (OSError, ValueError):
            pass
    return _MEMO


def _save_cache(cache: dict) -> None:
    path = _cache_file()
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs re-hashing
        tmp.unlink(missing_ok=True)


def sha1_file(path) -> str:
    """SHA-1 of every byte of a file."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sha1_sampled(path, size: int, block: int, blocks: int) -> str:
    """SHA-1 of the size and ``blocks`` blocks of ``block`` bytes at evenly spaced offsets (first and last included)."""
    h = hashlib.sha1(f"size={size}".encode())
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek(max(0, size - block) * i // (blocks - 1))
            h.update(f.read(block))
    return h.hexdigest()


def _hash_file(path: Path, size: int) -> tuple[str, str]:
    if size <= full_hash_limit():
        return sha1_file(path)[:16], "full"
    return sha1_sampled(path, size, BLOCK, BLOCKS)[:16], "sampled"


def file_fingerprint(path, detail: bool = False):
    """Content fingerprint of a file (see module doc); ``detail=True`` returns a dict with the method."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache = _load_cache()
    rec = cache.get(key)
    if rec is None:
        fp, method = _hash_file(p, st.st_size)
        rec = {"fingerprint": fp, "method": method, "bytes": st.st_size}
        cache[key] = rec
        _save_cache(cache)
    return dict(rec) if detail else rec["fingerprint"]


def folder_fingerprint(folder, exclude=(".git",)) -> str:
    """Fingerprint of every file below ``folder`` (relative names + contents; hidden folders skipped)."""
    root = Path(folder)
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") or part in exclude for part in rel.parts):
            h.update(f"{rel.as_posix()}\t{file_fingerprint(p)}\n".encode())
    return h.hexdigest()[:16]


def tensors_fingerprint(module) -> str:
    """Hash of a torch module's state dict: names, shapes, dtypes and bytes of every tensor."""
    import torch

    h = hashlib.sha1()
    for key, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}\n".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _hub_snapshot(repo_id: str) -> Optional[Path]:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not in the local cache (or no huggingface_hub): content unknown
        return None


def model_fingerprint(name: str) -> str:
    """Content fingerprint of model ``name`` (embedded alias, local folder or hub id), see module doc."""
    from rcd.models import EMBEDDED, embedded_file

    if name in EMBEDDED:
        return "gguf:" + file_fingerprint(embedded_file(name))
    p = Path(name).expanduser()
    if p.is_dir():
        return "files:" + folder_fingerprint(p)
    snap = _hub_snapshot(name)
    if snap is not None:
        return "files:" + folder_fingerprint(snap)
    return f"hub:{name}"


#: rcd folders whose code does not change what a run computes (tables, figures and reports of finished runs)
_NOT_COMPUTING = ("paper",)


@lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """Fingerprint of the rcd code a run computes with: every ``.py`` file of the package (names and
    contents), except :data:`_NOT_COMPUTING`. The same code installed anywhere (a checkout, a wheel) gives
    the same value; any edit, committed or not, gives another."""
    pkg = Path(__file__).resolve().parent
    h = hashlib.sha1()
    for p in sorted(pkg.rglob("*.py")):
        rel = p.relative_to(pkg)
        if rel.parts[0] in _NOT_COMPUTING or "__pycache__" in rel.parts:
            continue
        h.update(f"{rel.as_posix()}\t{file_fingerprint(p)}\n".encode())
    return h.hexdigest()[:16]


def describe_code(code: Optional[dict]) -> str:
    """``commit 1a2b3c4 (dirty), source 5d6e...`` of a :func:`code_version` record (old records: unknown)."""
    if not isinstance(code, dict) or not code.get("source"):
        return "rcd code of unknown source (a result written before rcd recorded its source fingerprint)"
    commit = code.get("commit")
    where = f"commit {commit[:10]}{' with uncommitted edits' if code.get('dirty') else ''}" if commit else \
        f"rcd {code.get('rcd') or '?'}"
    return f"{where}, source {code['source']}"


def computed_by_this_code(results: dict) -> bool:
    """Whether a run's ``results.json`` was computed by this rcd code (same :func:`source_fingerprint`)."""
    then = (results.get("run") or {}).get("code") if isinstance(results, dict) else None
    return isinstance(then, dict) and then.get("source") == source_fingerprint()


@lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """rcd's version, its :func:`source_fingerprint` and, when it runs from a git checkout, the commit and
    whether the tree is dirty."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("rcd")
    except PackageNotFoundError:
        ver = None
    repo = Path(__file__).resolve().parents[1]
    out: dict[str, Any] = {"rcd": ver, "source": source_fingerprint(), "commit": None, "dirty": None}
    if (repo / ".git").exists():
        try:
            out["commit"] = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
            status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout
            out["dirty"] = bool(status.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return out


# ---------------------------------------------------------------- runs
REPO = Path(__file__).resolve().parents[1]


def _as_file(value: str) -> Optional[Path]:
    """The existing file (or, for values with a '/', folder) a config string names, if any."""
    if not isinstance(value, str) or not value or "\n" in value or len(value) > 4096:
        return None
    p = Path(value).expanduser()
    for cand in ([p] if p.is_absolute() else [p, REPO / p]):
        try:
            if cand.is_file() or ("/" in value and cand.is_dir()):
                return cand
        except OSError:
            return None
    return None


def _content(p: Path) -> dict[str, Any]:
    if p.is_dir():
        return {"path": str(p), "fingerprint": "files:" + folder_fingerprint(p), "method": "folder"}
    rec = file_fingerprint(p, detail=True)
    return {"path": str(p), **rec}


def run_identity(cfg) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``(hashed, inputs)`` of a run config (a DictConfig or a plain dict).

    ``inputs``: content fingerprints of every input the config names, by dotted key —
    ``model`` (:func:`model_fingerprint` of ``model.name``); every string value that names an
    existing file (relative to the working directory or the rcd checkout) or folder
    (``corpus.heldout.data_files``, ``task.path``, ...); files a corpus loader reads without naming
    them (its ``input_files``, e.g. the Shakespeare works): ``<corpus key>.input_files[i]``.

    ``hashed``: the config with each of those values replaced by ``content:<fingerprint>`` (a model
    folder too), plus ``_inputs`` for the model and loader files: what a run's hash covers.
    """
    from hydra.utils import get_method
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
    inputs: dict[str, dict[str, Any]] = {}
    extra: dict[str, str] = {}
    model = d.get("model") if isinstance(d.get("model"), dict) else {}
    if model.get("name"):
        fp = model_fingerprint(str(model["name"]))
        inputs["model"] = {"name": model["name"], "fingerprint": fp}
        extra["model"] = fp

    def walk(node, key):
        if isinstance(node, dict):
            return {k: walk(v, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{key}[{i}]") for i, v in enumerate(node)]
        if key == "model.name":
            p = Path(str(node)).expanduser()
            return f"content:{extra['model']}" if "model" in extra and p.is_dir() else node
        p = _as_file(node)
        if p is None:
            return node
        inputs[key] = _content(p)
        return "content:" + inputs[key]["fingerprint"]

    hashed = walk({k: v for k, v in d.items() if k not in ("runs_root", "datastore_root")}, "")
    for key in ("corpus.datastore", "corpus.heldout"):
        node = (d.get("corpus") or {}).get(key.split(".")[1]) if isinstance(d.get("corpus"), dict) else None
        if not isinstance(node, dict) or not node.get("_target_"):
            continue
        params = dict(node)
        try:
            files = getattr(get_method(params.pop("_target_")), "input_files", None)
        except Exception:  # an unimportable loader is refused by start-up validation
            files = None
        for i, p in enumerate(files(**params) if files is not None else []):
            inputs[f"{key}.input_files[{i}]"] = _content(Path(p))
            extra[f"{key}.input_files[{i}]"] = inputs[f"{key}.input_files[{i}]"]["fingerprint"]
    for key, module, path in outside_modules(d):
        inputs[key] = {"module": module, **_content(path)}
        extra[key] = inputs[key]["fingerprint"]
    hashed["_inputs"] = dict(sorted(extra.items()))
    return hashed, inputs


def _targets(node, key: str = ""):
    """(dotted key, value) of every ``_target_`` in a plain config tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            sub = f"{key}.{k}" if key else str(k)
            if k == "_target_" and isinstance(v, str):
                yield sub, v
            else:
                yield from _targets(v, sub)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _targets(v, f"{key}[{i}]")


def module_file(target: str) -> tuple[Optional[str], Optional[Path]]:
    """(module, source file) of the module a ``_target_`` (``pkg.module.attr``) lives in: the longest
    importable prefix; (None, None) when none is importable (start-up validation refuses it)."""
    import importlib.util

    parts = target.split(".")
    for n in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:n])
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError, AttributeError):
            spec = None
        if spec is not None:
            origin = getattr(spec, "origin", None)
            return name, (Path(origin) if origin and origin not in ("built-in", "frozen") and
                          Path(origin).is_file() else None)
    return None, None


def outside_modules(d: dict) -> list[tuple[str, str, Path]]:
    """``(code.<module>, module, file)`` for each module outside rcd that a ``_target_`` of config ``d`` names
    (an outside control, schedule, unit or loader): its source file is part of the run's identity, so an
    edit to it gives a new run folder instead of the results of the old code. rcd's own code is recorded,
    not hashed (:func:`code_version`; a result of other rcd code is reported on reuse)."""
    out, seen = [], set()
    for _, target in _targets({k: v for k, v in d.items() if k != "hydra"}):
        top = target.split(".")[0]
        if top in ("rcd", "hydra_plugins") or target in seen:
            continue
        seen.add(target)
        module, path = module_file(target)
        if module is None or path is None or any(m == module for _, m, _ in out):
            continue
        out.append((f"code.{module}", module, path))
    return out
