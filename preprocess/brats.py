"""Convert one BraTS case (4 NIfTI contrasts + optional seg) into the store. Pure: no Ray, testable directly.

Steps: validate (all modalities, one grid, finite intensities, labels in the release's set) -> crop to the bounding
box of brain (nonzero in any modality) and tumour -> transpose NIfTI (X, Y, Z) to store (Z, Y, X) -> store the
cropped original int16 intensities + per-channel brain mean/std (the reader z-scores on read) -> canonical labels
(4 -> 3 for 2018-2021) -> sampled foreground coordinates -> atomic write.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from distseg.data.labels import BRATS_CHANNELS, BRATS_LABEL_VALUES, BRATS_REGIONS
from distseg.data.store import CaseArrays
from preprocess.common import CaseError, placement, precheck, result_row, sample_foreground, source_fingerprints
from preprocess.discover import MODALITIES, SourceCase
from preprocess.nifti import SourceError, Volume, load_nifti
from preprocess.writer import Layout, root_attrs_base, write_case

logger = logging.getLogger(__name__)

# Source label value -> canonical stored value, per release convention.
SOURCE_LABELS: dict[str, dict[int, int]] = {
    "brats2018": {0: 0, 1: 1, 2: 2, 4: 3},
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 3},
}
AFFINE_ATOL = 1e-3  # mm: affines written by different tools for one scan agree far better than this
INT16 = np.iinfo(np.int16)


def brats_root_attrs() -> dict[str, Any]:
    return root_attrs_base("brats3d", list(BRATS_CHANNELS), dict(BRATS_LABEL_VALUES), dict(BRATS_REGIONS))


def _as_int16_or_float(vol: Volume) -> np.ndarray:
    """Intensities as int16 when lossless (BraTS ships int16), else float32. Raises on non-finite values."""
    d = vol.data
    if d.dtype.kind in "iu":
        if d.size and (d.min() < INT16.min or d.max() > INT16.max):
            return d.astype(np.float32)
        return d.astype(np.int16, copy=False)
    if d.dtype.kind != "f":
        raise CaseError(f"{vol.path}: intensity dtype {d.dtype}; expected integer or floating point voxels")
    if not np.isfinite(d).all():
        n = int((~np.isfinite(d)).sum())
        raise CaseError(f"{vol.path}: {n} non-finite (NaN/inf) intensities; expected finite values")
    if d.size and np.array_equal(d, np.rint(d)) and d.min() >= INT16.min and d.max() <= INT16.max:
        return d.astype(np.int16)
    return d.astype(np.float32)


def _check_labels(vol: Volume, convention: str) -> tuple[np.ndarray, dict[str, int]]:
    """seg (X, Y, Z) -> integer array (same layout) + source label counts. Raises on values outside the release set.

    Counting each allowed value (4 byte compares) is ~3x faster than `np.bincount`, which first widens the whole
    volume to intp; the slow `np.unique` only runs to name unexpected values.
    """
    d = vol.data
    allowed = SOURCE_LABELS[convention]
    if d.dtype.kind == "f":
        if not (np.isfinite(d).all() and np.array_equal(d, np.rint(d))):
            raise CaseError(f"{vol.path}: non-integer label values; expected {sorted(allowed)}")
        d = d.astype(np.int16)
    elif d.dtype.kind not in "iu":
        raise CaseError(f"{vol.path}: label dtype {d.dtype}; expected integers")
    counts = {str(v): int(np.count_nonzero(d == v)) for v in sorted(allowed)}
    if sum(counts.values()) != d.size:
        bad = [int(v) for v in np.unique(d) if int(v) not in allowed]
        raise CaseError(
            f"{vol.path}: unexpected label values {bad}; expected only {sorted(allowed)} ({convention} convention)"
        )
    return d, counts


def _canonical(label: np.ndarray, convention: str) -> np.ndarray:
    """Source label values -> canonical uint8 (any shape); values already validated."""
    lut = np.zeros(256, dtype=np.uint8)
    for src, dst in SOURCE_LABELS[convention].items():
        lut[src] = dst
    return lut[label.astype(np.uint8, copy=False)]


def _load_checked(case: SourceCase) -> tuple[list[Volume], Volume | None, dict[str, str]]:
    missing = [m for m in MODALITIES if m not in case.files]
    if missing:
        some = next(iter(case.files.values()))
        raise CaseError(
            f"{case.case_id}: missing modality {', '.join(missing)}: expected "
            f"{', '.join(str(some.parent / case.expected_name(m)) for m in missing)}"
        )
    digests: dict[str, str] = {}
    vols = []
    for m in (*MODALITIES, "seg"):
        if m not in case.files:
            continue
        try:
            vol, digests[m] = load_nifti(case.files[m])
        except SourceError as e:
            raise CaseError(str(e)) from e
        ref = vols[0] if vols else None
        if ref is not None and vol.data.shape != ref.data.shape:
            raise CaseError(
                f"{vol.path}: shape {vol.data.shape} differs from {ref.path.name} {ref.data.shape}; "
                "expected every modality and the seg on one voxel grid"
            )
        if ref is not None and not np.allclose(vol.affine, ref.affine, rtol=0, atol=AFFINE_ATOL):
            raise CaseError(
                f"{vol.path}: affine differs from {ref.path.name} (max abs diff "
                f"{np.abs(vol.affine - ref.affine).max():.4g} mm); expected one voxel grid for the whole case"
            )
        vols.append(vol)
    seg = vols.pop() if "seg" in case.files else None
    return vols, seg, digests


def convert_brats_case(case: SourceCase, store_path: Path, fold: int, layout: Layout, force: bool = False
                       ) -> dict[str, Any]:
    """Convert (or skip, when already converted from unchanged sources) one case; never raises for bad input.

    Returns a manifest row (see `result_row`) with status ok | skipped | failed and a one-line error.
    """
    t0 = time.perf_counter()
    source = str(next(iter(case.files.values())).parent) if case.files else ""
    try:
        existing = precheck(case, source, store_path, fold, force)
        if existing is not None:
            return result_row(case.case_id, "skipped", attrs=existing, seconds=time.perf_counter() - t0)
        attrs = _convert(case, store_path, fold, layout, source)
    except CaseError as e:
        return result_row(case.case_id, "failed", str(e), source=source, seconds=time.perf_counter() - t0)
    except Exception as e:  # an unforeseen failure still becomes a row, never a crashed job
        logger.exception("case %s failed", case.case_id)
        msg = f"{source}: {type(e).__name__}: {e}"
        return result_row(case.case_id, "failed", msg, source=source, seconds=time.perf_counter() - t0)
    return result_row(case.case_id, "ok", attrs=attrs, seconds=time.perf_counter() - t0)


def _convert(case: SourceCase, store_path: Path, fold: int, layout: Layout, source: str) -> dict[str, Any]:
    fingerprints = source_fingerprints(case.files)
    prepared, foreground, digests = prepare_brats_case(case, fold)
    attrs = prepared.attrs
    attrs["sources"] = {m: {**fp, "sha256": digests[m]} for m, fp in fingerprints.items()}
    write_case(store_path, case.case_id, prepared.image, prepared.label, foreground, attrs, layout)
    return attrs


def prepare_brats_case(case: SourceCase, fold: int = -1) -> tuple[CaseArrays, dict[int, np.ndarray], dict[str, str]]:
    """Load, check, crop and describe one BraTS case in memory (what the store would hold), without writing.

    The one code path shared by conversion and by prediction from raw NIfTI. Returns the case (raw int16/float32
    image (C, Z, Y, X), canonical uint8 label (Z, Y, X) or None, the store attributes), the sampled foreground
    coordinates per class and the sha256 of every source file. Raises CaseError naming the file for bad input.
    """
    if case.problems:
        raise CaseError("; ".join(case.problems))
    vols, seg, digests = _load_checked(case)
    source = str(vols[0].path.parent)
    chans = [_as_int16_or_float(v) for v in vols]
    dtype = np.int16 if all(c.dtype == np.int16 for c in chans) else np.float32
    # (X, Y, Z) Fortran-ordered nibabel arrays -> (Z, Y, X) C-ordered views: the transpose is free.
    chans_zyx = [c.T for c in chans]
    brain = chans_zyx[0] != 0
    for c in chans_zyx[1:]:
        brain |= c != 0
    label_zyx = None
    counts_src = None
    if seg is not None:
        label_xyz, counts_src = _check_labels(seg, case.naming)
        label_zyx = label_xyz.T
    extent = brain | (label_zyx != 0) if label_zyx is not None else brain
    if not extent.any():
        raise CaseError(f"{vols[0].path}: every modality is all zeros; expected a brain (nonzero voxels)")
    box = []
    for axis in range(3):
        proj = np.flatnonzero(extent.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append([int(proj[0]), int(proj[-1]) + 1])
    sl = tuple(slice(lo, hi) for lo, hi in box)
    image = np.stack([c[sl] for c in chans_zyx]).astype(dtype, copy=False)  # (C, Z, Y, X)
    n_brain = int(brain[sl].sum())
    means, stds = [], []
    for c in image:  # voxels outside the brain are 0 in every channel, so whole-array sums are brain sums
        if c.dtype == np.int16:  # exact integer sums; int16^2 fits int32, the total is accumulated in int64
            flat = c.ravel().astype(np.int32)
            s, ss = float(flat.sum(dtype=np.int64)), float(np.square(flat).sum(dtype=np.int64))
        else:
            flat = c.ravel().astype(np.float64)
            s, ss = float(flat.sum()), float(flat @ flat)
        mean = s / max(n_brain, 1)
        var = max(ss / max(n_brain, 1) - mean * mean, 0.0)
        means.append(float(mean))
        stds.append(float(np.sqrt(var)) if var > 0 else 1.0)
    label = np.ascontiguousarray(_canonical(label_zyx[sl], case.naming)) if label_zyx is not None else None
    foreground = sample_foreground(label, [1, 2, 3], case.case_id) if label is not None else {}
    sx, sy, sz = vols[0].spacing_xyz
    attrs: dict[str, Any] = {
        "case_id": case.case_id,
        "source_dir": source,
        "naming": case.naming,
        "label_convention": case.naming,
        "source_modalities": {m: case.files[m].name for m in (*MODALITIES, "seg") if m in case.files},
        "source_shape_xyz": list(vols[0].data.shape),
        "original_shape_zyx": list(vols[0].data.shape[::-1]),
        "affine": vols[0].affine.tolist(),
        "spacing": [sz, sy, sx],
        "crop_box_zyx": box,
        "store_to_source_axes": [2, 1, 0],
        "source_ndim": 3,
        "image_dtype": np.dtype(dtype).name,
        "normalization": {"mean": means, "std": stds, "mask": "nonzero_any", "applied": False},
        "brain_voxels": n_brain,
        **placement(case, fold),
        "has_label": label is not None,
        "shape": list(image.shape),
    }
    if label is not None:
        counts = np.bincount(label.ravel(), minlength=4)[:4]
        counts[0] += int(np.prod(vols[0].data.shape)) - label.size  # background outside the crop box
        attrs["label_counts"] = {str(i): int(counts[i]) for i in range(4)}
        attrs["label_counts_source"] = counts_src
    return CaseArrays(case.case_id, image, label, attrs), foreground, digests
