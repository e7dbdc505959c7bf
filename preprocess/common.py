"""Pieces shared by the BraTS and 2D converters: per-case result rows, folds, skip checks, foreground sampling."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from distseg.data.layout import TEST_FOLD, StoreError
from preprocess.nifti import file_fingerprint, sha256_file
from preprocess.writer import add_consolidated, read_case_doc, update_case_attrs, validate_case_id

logger = logging.getLogger(__name__)

FOREGROUND_CAP = 10_000
"""At most this many sampled voxel coordinates per class per case (enough for oversampling, small on disk)."""


class CaseError(Exception):
    """A case cannot be converted; the one-line message names the file and what was expected."""


FOLD_ASSIGNMENT = "int(sha256(subject or case_id)[:8], 16) % folds"
"""The fold rule (`--fold-assignment hash`), recorded in the store's root attrs."""
BALANCED_ASSIGNMENT = "subjects sorted by sha256(subject), then dealt round-robin over the folds"
"""`--fold-assignment balanced`: fold sizes differ by at most one subject, but adding subjects moves others."""
TEST_ASSIGNMENT = "listed in --test-subjects, or int(sha256('test:' + subject)[:8], 16) / 2**32 < --test-fraction"
"""The test-split rule, recorded in the store's root attrs."""


def fold_of(key: str, folds: int) -> int:
    """Deterministic fold: sha256(key) mod K. Independent of other cases, so adding cases never moves one."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % folds


def subject_key(case: Any) -> str:
    """What folds and the test split are drawn per: the case's subject, else its id (every slice or timepoint of
    one patient lands together)."""
    return case.subject or case.case_id


def case_fold(case: Any, folds: int) -> int:
    """Fold of a `SourceCase` by the hash rule (per subject, see `subject_key`)."""
    return fold_of(subject_key(case), folds)


def in_test_fraction(subject: str, fraction: float) -> bool:
    """The `--test-fraction` rule: deterministic per subject and independent of the others (a subject never moves
    between splits as the dataset grows)."""
    return int(hashlib.sha256(f"test:{subject}".encode()).hexdigest()[:8], 16) / 2**32 < fraction


def assign_folds(cases: list[Any], folds: int, test_subjects: set[str] | None = None, test_fraction: float = 0.0,
                 balanced: bool = False) -> dict[str, int]:
    """{case_id: fold} for every case: `TEST_FOLD` for the test split (subjects listed in `test_subjects`, matched
    by subject or case id, or drawn by `in_test_fraction`), else the fold of its subject: the hash rule, or with
    `balanced` the remaining subjects sorted by hash and dealt round-robin (fold sizes differ by at most one)."""
    test_subjects = test_subjects or set()
    test = {subject_key(c) for c in cases
            if subject_key(c) in test_subjects or c.case_id in test_subjects
            or in_test_fraction(subject_key(c), test_fraction)}
    pool = sorted({subject_key(c) for c in cases} - test, key=lambda s: (hashlib.sha256(s.encode()).hexdigest(), s))
    fold_by_subject = {s: (i % folds if balanced else fold_of(s, folds)) for i, s in enumerate(pool)}
    return {c.case_id: TEST_FOLD if subject_key(c) in test else fold_by_subject[subject_key(c)] for c in cases}


def placement(case: Any, fold: int) -> dict[str, Any]:
    """The attrs that place a case in the dataset (not derived from its pixels): rewritten in place on a rerun.
    `fold` `TEST_FOLD` puts the case in the test split (a raw case predicted outside any store has it too)."""
    return {"fold": fold, "split": "test" if fold == TEST_FOLD else "train", "subject": case.subject,
            "slice_index": case.slice_index}


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
    refreshed fingerprints are rewritten in place (and a case written before 2026-12-08 gets its arrays' metadata
    consolidated into its group zarr.json).
    """
    doc = read_case_doc(store_path, case_id)
    attrs = None if doc is None else doc.get("attributes", {})
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
    if "consolidated_metadata" not in doc:  # written before 2026-12-08: upgrade in place (first patch: 3 opens)
        try:
            add_consolidated(store_path, case_id)
        except (OSError, ValueError, StoreError) as e:  # an array's metadata is damaged: convert the case again
            logger.warning("case %s: its stored metadata cannot be consolidated (%s); converting it again", case_id, e)
            return None
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
        "split": a.get("split"),
        "subject": a.get("subject"),
        "slice_index": a.get("slice_index"),
        "seconds": seconds,
    }
