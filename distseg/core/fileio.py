"""Atomic file writes: every output is written under a temporary name in its final folder, then renamed.

A reader (or a run killed mid-write) never sees half a file; `os.replace` is atomic on POSIX file systems.
"""

from __future__ import annotations

import json
import math
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


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """`text` (UTF-8) written to a temporary sibling and renamed onto `path`."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_safe(value: Any) -> Any:
    """Strict JSON: non-finite floats become strings ("inf", "nan") instead of invalid tokens."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """`obj` as indented strict JSON (non-finite floats as strings), written like `write_text`."""
    write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def inside(folder: str | os.PathLike[str], name: str) -> Path:
    """``folder / name`` for a `name` taken from data (a case id plus a suffix): refuses anything but one plain path
    component, so an id read from a store or a file name can never write outside `folder` (``../x``, ``/abs``,
    ``..``, separators, NUL or control characters)."""
    if (not name or name in {".", ".."} or "/" in name or "\\" in name or os.sep in name
            or any(ord(c) < 32 for c in name)):
        raise ValueError(f"{name!r} is not a plain file name: refusing to write it under {folder}")
    return Path(folder) / name
