"""Files and directories that are either whole or absent: a text file written beside its target and
renamed over it (``os.replace``), a directory built under a temporary name and renamed into place.
A run killed mid-write leaves the previous version (docs/architecture.md, "Stages")."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Moves a finished directory into place; an existing one is moved aside first, then deleted."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_model_atomically(directory: Path, write: Callable[[Path], None], *, is_main: bool) -> None:
    """Writes a model directory through a temporary sibling and a rename (rank 0 writes)."""
    if not is_main:
        return
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    replace_dir(tmp, directory)
