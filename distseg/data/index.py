"""The store's case index (`index.json`): every complete case's attrs in one file, written by a preprocessing run
that finished and removed when the next one starts, so opening a store reads one file instead of one per case."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from distseg.data.layout import CASES_GROUP, FORMAT_VERSION, INDEX_FILE, PREVIOUS_INDEX, StoreError, read_json

logger = logging.getLogger(__name__)


def load_index(store: Path | Any) -> dict[str, dict[str, Any]] | None:
    """{case_id: attrs} from `<store>/index.json`, or None when there is none or it cannot be trusted (then the
    reader lists `cases/` and reads each case's metadata). `store`: a folder or a `distseg.data.location.Location`."""
    store_path = store if isinstance(store, Path) else store.url
    try:
        index = read_json(store / INDEX_FILE) if isinstance(store, Path) else store.read_json(INDEX_FILE)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, StoreError) as e:
        logger.warning("%s: unreadable %s (%s); reading each case's metadata instead", store_path, INDEX_FILE, e)
        return None
    if index.get("format_version") != FORMAT_VERSION or not isinstance(index.get("cases"), dict):
        logger.warning("%s: %s is not a version-%d case index; reading each case's metadata instead",
                       store_path, INDEX_FILE, FORMAT_VERSION)
        return None
    return dict(index["cases"])


def write_index(store_path: Path) -> int:
    """Write `<store>/index.json` with every complete case's attrs (atomically); returns the number of cases.
    Called by the preprocessing driver once all its cases are written (`remove_index` when a run starts). When the
    content equals the index parked by `remove_index` (a rerun that changed nothing), that file is put back as it
    was, so an unchanged store stays byte- and timestamp-identical."""
    cases_dir = store_path / CASES_GROUP
    cases = {}
    for cid in sorted(os.listdir(cases_dir)) if cases_dir.is_dir() else []:
        try:
            cases[cid] = read_json(cases_dir / cid / "zarr.json").get("attributes", {})
        except (FileNotFoundError, NotADirectoryError):  # the group's own zarr.json, or not a complete case
            continue
    data = json.dumps({"format_version": FORMAT_VERSION, "cases": cases}, separators=(",", ":")).encode("utf-8")
    previous = store_path / PREVIOUS_INDEX
    try:
        if previous.read_bytes() == data:
            previous.replace(store_path / INDEX_FILE)
            return len(cases)
    except FileNotFoundError:
        pass
    tmp = store_path / f".{INDEX_FILE}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    tmp.replace(store_path / INDEX_FILE)
    previous.unlink(missing_ok=True)
    return len(cases)


def remove_index(store_path: Path) -> None:
    """Take the case index away before cases change, so readers never trust a stale one (it is parked under
    `PREVIOUS_INDEX` for `write_index` to compare with)."""
    with contextlib.suppress(FileNotFoundError):
        (store_path / INDEX_FILE).replace(store_path / PREVIOUS_INDEX)
