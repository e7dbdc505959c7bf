"""Atomic file writes: every output is written under a temporary name in its final folder, then renamed.

A reader (or a run killed mid-write) never sees half a file; `os.replace` is atomic on POSIX file systems.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any], fsync: bool = False) -> Path:
    """Call `write(tmp)` for a hidden temporary file beside `path` that keeps its suffixes (``.nii.gz``, ``.png``:
    libraries that pick the format from the name still work), then rename it to `path`. Returns `path`.

    `fsync`: flush the file's data to stable storage before the rename (checkpoint metadata: the rename must never
    become visible before the bytes it names)."""
    path = Path(path)
    stem = path.name.split(".")[0]
    suffix = "".join(path.suffixes[-2:]) if path.suffixes else ".tmp"
    tmp = path.with_name(f".{stem}.{uuid.uuid4().hex[:12]}{suffix}")
    try:
        write(tmp)
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's data, or a folder's entries (names created or renamed in it), to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
