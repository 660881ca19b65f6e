"""Storage primitives every datastore unit writes and reads with.

* :class:`NpyAppender` streams rows of unknown count into a memory-mappable ``.npy``;
  :func:`open_array` opens one listed in a manifest and checks its shape and dtype;
  :func:`array_spec` is the manifest entry of an array;
* :class:`StringsWriter` / :class:`Strings`: UTF-8 strings in ``<name>.bin`` with offsets in
  ``<name>_offsets.npy`` (random access, memory-mapped);
* :func:`atomic_folder`: a build writes into ``.building-<name>-<host>_<pid>`` and is renamed into
  place only when it wrote its manifest (left-overs of dead processes are removed);
* :func:`concat_array` / :func:`concat_strings`: the streaming concatenation a shard merge uses.

Nothing here knows a unit, a model or a manifest's meaning (that is :mod:`rcd.datastore.base`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from rcd.errors import RcdError

BLOCK = 65536  # rows per block when streaming arrays


class DatastoreError(RcdError, RuntimeError):
    """A datastore that is missing, corrupt, incomplete or built for another model."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _host() -> str:
    import socket

    return re.sub(r"[^A-Za-z0-9.]+", ".", socket.gethostname()) or "host"


def process_tag() -> str:
    """``<host>_<pid>``: names this process's temporary files and folders uniquely, also across the
    machines of a cluster that share the datastore folder (Ray workers, SLURM jobs)."""
    return f"{_host()}_{os.getpid()}"


def clean_stale_builds(root: Path) -> None:
    """Remove ``.building-*`` folders left by builds on this machine whose process is gone (another
    machine's builds are left alone: its processes cannot be checked from here)."""
    for p in root.glob(".building-*"):
        host, _, pid = p.name.rsplit("-", 1)[-1].rpartition("_")
        if host and host != _host():
            continue
        try:
            pid = int(pid)
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success rename it to ``final``, on error delete it."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_builds(final.parent)
        tmp = final.parent / f".building-{final.name}-{process_tag()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise DatastoreError(f"cannot build datastore {final.name} in {final.parent} ({e.strerror}): set "
                             "datastore_root=<a writable folder> (or RCD_CACHE)") from None
    try:
        yield tmp
        if not (tmp / "manifest.json").exists():
            raise DatastoreError(f"internal error: build of {final} wrote no manifest")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp-{process_tag()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def open_array(folder: Path, spec: dict[str, Any], mmap: bool = True) -> np.ndarray:
    """Open a .npy listed in the manifest and check its shape and dtype."""
    path = folder / spec["file"]
    if not path.exists():
        raise DatastoreError(f"{path} is missing: the datastore is incomplete; delete {folder} and rebuild")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None)
    except (ValueError, OSError) as e:
        raise DatastoreError(f"{path} is corrupt ({e}); delete {folder} and rebuild") from e
    if list(arr.shape) != list(spec["shape"]) or str(arr.dtype) != spec["dtype"]:
        raise DatastoreError(f"{path} has shape {list(arr.shape)} / {arr.dtype}, manifest says "
                             f"{spec['shape']} / {spec['dtype']}: corrupt datastore; delete {folder} and rebuild")
    return arr


def array_spec(file: str, arr_or_shape, dtype=None) -> dict[str, Any]:
    if isinstance(arr_or_shape, np.ndarray):
        return {"file": file, "shape": list(arr_or_shape.shape), "dtype": str(arr_or_shape.dtype)}
    return {"file": file, "shape": list(arr_or_shape), "dtype": str(np.dtype(dtype))}


class NpyAppender:
    """Writes a ``.npy`` array of unknown length block by block; the header is written on close.

    The header is a fixed 128 bytes (a valid format-1.0 header), so rows are streamed straight to
    disk and the result is memory-mappable with ``np.load(mmap_mode="r")``.
    """

    HEADER = 128

    def __init__(self, path: Path, dtype, row_shape: tuple = ()):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.n = 0
        self.f = open(self.path, "wb")
        self.f.write(b"\0" * self.HEADER)

    def append(self, rows) -> None:
        a = np.ascontiguousarray(rows, dtype=self.dtype)
        if a.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: rows of shape {a.shape[1:]}, expected {self.row_shape}")
        self.f.write(a.tobytes())
        self.n += a.shape[0]

    def close(self) -> dict:
        shape = (self.n,) + self.row_shape
        header = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (
            np.lib.format.dtype_to_descr(self.dtype), shape)
        hlen = self.HEADER - 10
        if len(header) >= hlen:
            raise ValueError(f"{self.path}: header too long")
        self.f.seek(0)
        self.f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", hlen) + (header.ljust(hlen - 1) + "\n").encode("latin1"))
        self.f.close()
        return array_spec(self.path.name, shape, self.dtype)


class StringsWriter:
    """Appends strings to ``<name>.bin`` (UTF-8) with offsets in ``<name>_offsets.npy`` [count+1]."""

    def __init__(self, folder: Path, name: str):
        self.name = name
        self.bin = open(Path(folder) / f"{name}.bin", "wb")
        self.offsets = NpyAppender(Path(folder) / f"{name}_offsets.npy", np.int64)
        self.offsets.append([0])
        self.pos = 0

    def add(self, strings: Sequence[str]) -> None:
        if not strings:
            return
        enc = [s.encode("utf-8", "replace") for s in strings]
        self.bin.write(b"".join(enc))
        ends = self.pos + np.cumsum([len(b) for b in enc], dtype=np.int64)
        self.offsets.append(ends)
        self.pos = int(ends[-1])

    def close(self) -> dict:
        self.bin.close()
        spec = self.offsets.close()
        return {"bin": f"{self.name}.bin", "offsets": spec, "count": spec["shape"][0] - 1, "bytes": self.pos}


class Strings:
    """Random access to strings written by :class:`StringsWriter` (memory-mapped)."""

    def __init__(self, folder: Path, spec: dict):
        folder = Path(folder)
        self.offsets = open_array(folder, spec["offsets"])
        path = folder / spec["bin"]
        if not path.exists():
            raise DatastoreError(f"{path} is missing: the datastore is incomplete; delete {folder} and rebuild")
        if path.stat().st_size != spec["bytes"]:
            raise DatastoreError(f"{path} has {path.stat().st_size} bytes, manifest says {spec['bytes']}: "
                                 f"corrupt datastore; delete {folder} and rebuild")
        self.buf = np.memmap(path, dtype=np.uint8, mode="r") if spec["bytes"] > 0 else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"string {i} out of range 0..{len(self) - 1}")
        return bytes(self.buf[int(self.offsets[i]):int(self.offsets[i + 1])]).decode("utf-8", "replace")

    def block(self, start: int, stop: int) -> list[str]:
        return [self[i] for i in range(start, stop)]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def concat_array(parts: list[Path], specs: Sequence[dict], tmp: Path, shift: Optional[list[int]] = None,
                 column: Optional[int] = None) -> dict:
    """Concatenate array ``specs[j]`` of part folder ``parts[j]`` into ``tmp`` (block by block, under
    the same relative file name as part 0's).

    ``shift[j]`` is added to part j's values (to ``[:, column]`` only when ``column`` is given).
    """
    arrays = [open_array(p, s) for p, s in zip(parts, specs)]
    out = NpyAppender(tmp / specs[0]["file"], arrays[0].dtype, arrays[0].shape[1:])
    for j, a in enumerate(arrays):
        if a.shape[1:] != arrays[0].shape[1:] or a.dtype != arrays[0].dtype:
            raise DatastoreError(f"cannot merge {parts[j]}: {specs[0]['file']} is {a.shape[1:]}/{a.dtype}, "
                                 f"shard 0 has {arrays[0].shape[1:]}/{arrays[0].dtype}")
        for s in range(0, a.shape[0], BLOCK):
            blk = np.array(a[s:s + BLOCK])
            if shift is not None and shift[j]:
                if column is None:
                    blk += shift[j]
                else:
                    blk[:, column] += shift[j]
            out.append(blk)
    spec = out.close()
    spec["file"] = specs[0]["file"]
    return spec


def concat_strings(parts: list[Path], specs: Sequence[dict], tmp: Path) -> dict:
    """Concatenate string stores ``specs[j]`` (``.bin`` + offsets) of the parts into ``tmp``."""
    name = specs[0]["bin"][: -len(".bin")]
    offsets = NpyAppender(tmp / f"{name}_offsets.npy", np.int64)
    offsets.append([0])
    pos = 0
    with open(tmp / f"{name}.bin", "wb") as out:
        for p, spec in zip(parts, specs):
            strings = Strings(p, spec)  # checks sizes
            with open(p / spec["bin"], "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
            off = np.asarray(strings.offsets, dtype=np.int64)
            offsets.append(off[1:] + pos)
            pos += int(off[-1])
    spec = offsets.close()
    return {"bin": f"{name}.bin", "offsets": spec, "count": spec["shape"][0] - 1, "bytes": pos}
