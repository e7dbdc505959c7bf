"""Where a store lives: a POSIX folder or an S3-compatible prefix, behind one small interface (`Location`).

The reader (`distseg.data.store`) asks a location for JSON documents, folder listings and byte sources
(`distseg.data.shards.ByteSource`) by store-relative key (``cases/<id>/image/zarr.json``). POSIX paths are read
with plain file calls (the fast path measured in .notes/preprocess.md); ``s3://bucket/prefix`` goes through zarr's
storage layer (`distseg.data.remote`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from distseg.data.shards import ByteSource, LocalFiles


def is_remote(path: str | os.PathLike[str]) -> bool:
    """True for object-store URLs (``s3://bucket/prefix``)."""
    return str(path).startswith("s3://")


class Location(Protocol):
    url: str
    """The store's own name in messages: an absolute path or ``s3://bucket/prefix``."""

    def read_json(self, key: str) -> dict[str, Any]:
        """The JSON document at `key`; FileNotFoundError when absent, ValueError when not JSON."""

    def list_dir(self, key: str) -> list[str]:
        """Names directly under `key` (folders and files); [] when there are none."""

    def exists(self, key: str) -> bool:
        """Whether the file or object `key` exists."""

    def source(self, key: str) -> ByteSource:
        """Partial reads of the objects under `key` (one array's folder)."""


class LocalLocation:
    """A store folder on a POSIX file system."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def read_json(self, key: str) -> dict[str, Any]:
        with open(self.root / key, encoding="utf-8") as f:
            return json.load(f)

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def list_dir(self, key: str) -> list[str]:
        try:
            return os.listdir(self.root / key)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def source(self, key: str) -> ByteSource:
        return LocalFiles(self.root / key)


def open_location(path: str | os.PathLike[str]) -> Location:
    """`LocalLocation` for a path, `distseg.data.remote.RemoteLocation` for ``s3://...``."""
    if is_remote(path):
        from distseg.data.remote import RemoteLocation

        return RemoteLocation(str(path))
    return LocalLocation(path)


def path_or_url(text: str) -> str | Path:
    """argparse type for a path a user gives: an ``s3://`` URL stays a string (`Path` would fold its ``//``), anything
    else becomes a `Path`."""
    return text if is_remote(text) else Path(text)
