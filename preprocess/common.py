"""Pieces shared by the BraTS and 2D converters: per-case result rows, folds, skip checks, foreground sampling."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.nifti import file_fingerprint, sha256_file
from preprocess.writer import read_case_attrs, update_case_attrs, validate_case_id

FOREGROUND_CAP = 10_000
"""At most this many sampled voxel coordinates per class per case (enough for oversampling, small on disk)."""


class CaseError(Exception):
    """A case cannot be converted; the one-line message names the file and what was expected."""


FOLD_ASSIGNMENT = "int(sha256(subject or case_id)[:8], 16) % folds"
"""The fold rule, recorded in the store's root attrs."""


def fold_of(key: str, folds: int) -> int:
    """Deterministic fold: sha256(key) mod K. Independent of other cases, so adding cases never moves one."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % folds


def case_fold(case: Any, folds: int) -> int:
    """Fold of a `SourceCase`: per subject (every slice/timepoint of one patient lands in one fold), by case id
    for a case without a subject."""
    return fold_of(case.subject or case.case_id, folds)


def placement(case: Any, fold: int) -> dict[str, Any]:
    """The attrs that place a case in the dataset (not derived from its pixels): rewritten in place on a rerun."""
    return {"fold": fold, "subject": case.subject, "slice_index": case.slice_index}


def source_fingerprints(files: dict[str, Path]) -> dict[str, dict[str, Any]]:
    return {mod: {"path": str(p), **file_fingerprint(p)} for mod, p in sorted(files.items())}


def precheck(case: Any, source: str, store_path: Path, fold: int, force: bool) -> dict[str, Any] | None:
    """Shared start of every per-case converter: raise CaseError for a case that cannot be converted (discovery
    problems, an unsafe case id), return the stored attrs of a case already converted from unchanged sources
    (unless `force`), else None (convert it). `case` is a `preprocess.discover.SourceCase`."""
    if case.problems:
        raise CaseError("; ".join(case.problems))
    try:
        validate_case_id(case.case_id)
    except ValueError as e:
        raise CaseError(f"{source}: {e}") from e
    return None if force else check_existing(store_path, case.case_id, case.files, placement(case, fold))


def check_existing(store_path: Path, case_id: str, files: dict[str, Path],
                   placed: dict[str, Any]) -> dict[str, Any] | None:
    """Attrs of an already-converted case whose sources are unchanged (size+mtime, else sha256), else None.

    A matching case keeps its data; only its `placed` attrs (fold, subject, slice index: see `placement`) and
    refreshed fingerprints are rewritten in place.
    """
    attrs = read_case_attrs(store_path, case_id)
    if attrs is None or "sources" not in attrs:
        return None
    old = attrs["sources"]
    if set(old) != set(files):
        return None
    now = source_fingerprints(files)
    same_stat = all(
        old[m]["size"] == now[m]["size"] and old[m]["mtime_ns"] == now[m]["mtime_ns"] for m in files
    )
    updates: dict[str, Any] = {}
    if not same_stat:
        if any(old[m]["size"] != now[m]["size"] for m in files):
            return None
        if any(old[m].get("sha256") != sha256_file(files[m]) for m in files):
            return None
        updates["sources"] = {m: {**now[m], "sha256": old[m]["sha256"]} for m in files}  # touched, not changed
    updates.update({k: v for k, v in placed.items() if k not in attrs or attrs[k] != v})
    if updates:
        update_case_attrs(store_path, case_id, updates)
        attrs = {**attrs, **updates}
    return attrs


def sample_foreground(label: np.ndarray, classes: list[int], seed_text: str) -> dict[int, np.ndarray]:
    """{cls: (N, 3) int (z, y, x)} with N <= FOREGROUND_CAP, sampled uniformly; deterministic per case."""
    rng = np.random.default_rng(int(hashlib.sha256(seed_text.encode()).hexdigest()[:8], 16))
    flat = label.ravel()
    out = {}
    for cls in classes:
        idx = np.flatnonzero(flat == cls)
        if len(idx) > FOREGROUND_CAP:
            idx = np.sort(idx[rng.choice(len(idx), FOREGROUND_CAP, replace=False)])
        out[cls] = np.stack(np.unravel_index(idx, label.shape), axis=1)
    return out


def result_row(case_id: str, status: str, error: str = "", attrs: dict[str, Any] | None = None,
               source: str = "", seconds: float = 0.0) -> dict[str, Any]:
    """One manifest row. Columns are the same for every row (None where unknown) so the table is rectangular."""
    a = attrs or {}
    counts = a.get("label_counts")
    return {
        "case_id": case_id,
        "status": status,
        "error": error,
        "source": source or a.get("source_dir", ""),
        "naming": a.get("naming"),
        "label_convention": a.get("label_convention"),
        "has_label": a.get("has_label"),
        "original_shape_zyx": a.get("original_shape_zyx"),
        "stored_shape": a.get("shape"),
        "spacing_zyx": a.get("spacing"),
        "crop_box_zyx": json.dumps(a["crop_box_zyx"]) if "crop_box_zyx" in a else None,
        "label_counts": json.dumps(counts) if counts is not None else None,
        "label_counts_source": json.dumps(a["label_counts_source"]) if "label_counts_source" in a else None,
        "source_sha256": json.dumps({m: s.get("sha256") for m, s in a["sources"].items()}) if "sources" in a else None,
        "fold": a.get("fold"),
        "subject": a.get("subject"),
        "slice_index": a.get("slice_index"),
        "seconds": seconds,
    }
