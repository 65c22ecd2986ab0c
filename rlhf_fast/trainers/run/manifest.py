"""Checkpoints that cannot be silently wrong: ``manifest.json``, written last into a checkpoint
directory, lists every other file with its size and sha256. A checkpoint is complete and intact
when its manifest is there and every file matches it (``verify``): a save cut short (the manifest
was never written), a file truncated, replaced or deleted afterwards all fail the check, and
resuming skips such a checkpoint for the previous one (``trainers/run/checkpoints.py``).

Cost: one read of the checkpoint at save (rank 0) and one per process at resume (the result is
cached per directory and manifest, so the start decision and the load do not hash twice); sha256
runs at about 1-2 GB/s per core.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from rlhf_fast.trainers.run.atomic_files import atomic_write_text

MANIFEST = "manifest.json"
_CHUNK = 1 << 22

_verified: dict = {}  # (directory, manifest mtime_ns, size) -> the verdict


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> Path:
    """Writes ``directory/manifest.json`` (atomically) over every file under ``directory``."""
    directory = Path(directory)
    entries = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
               for p in _files(directory)}
    path = directory / MANIFEST
    atomic_write_text(path, json.dumps({"format": 1, "files": entries}, indent=1) + "\n")
    return path


def verify(directory: Path) -> Optional[str]:
    """None when ``directory`` matches its manifest; otherwise why not, naming the file."""
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        st = path.stat()
    except OSError:
        return f"{path} is missing (the save did not finish, or the checkpoint predates manifests)"
    key = (str(directory.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _verified:
        _verified[key] = _check(directory, path)
    return _verified[key]


def _check(directory: Path, path: Path) -> Optional[str]:
    try:
        files = json.loads(path.read_text())["files"]
        entries = [(name, int(e["bytes"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{path} cannot be read ({type(e).__name__}: {e})"
    for name, size, digest in entries:
        f = directory / name
        try:
            actual = os.stat(f).st_size
        except OSError:
            return f"{f} is missing (listed in {path})"
        if actual != size:
            return f"{f} has {actual} bytes, {path} says {size}"
        if sha256_of(f) != digest:
            return f"{f} does not match its sha256 in {path}"
    return None
