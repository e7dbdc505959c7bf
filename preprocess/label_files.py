"""Find, pair and read label files for evaluation (`launch/evaluate.py --pred DIR --gt DIR`).

Ground truth, in every layout the converter accepts:
- BraTS case folders in any release naming (`<case>_seg.nii.gz`, `BraTS-GLI-XXXXX-XXX-seg.nii.gz`): the label
  convention comes from the naming when the case also has its modalities;
- plain label files `<case_id>.nii.gz` / `<case_id>_seg.nii.gz` (`.nii` too): convention inferred from the values
  (4 present -> brats2018, 3 present -> brats2023, neither -> the regions are the same either way);
- 2D masks in the `discover_images2d` layouts (images/ + masks/, `X_mask.png` beside `X.png`, nested folders):
  foreground above half range, as the converter reads them (`binarize_mask`).
Predictions, as the predictor writes them: 3D `<case_id>.nii.gz` (uint8, source convention, the input's grid and
affine), 2D `<case_id>_mask.png` (any image type the converter reads; 0/255 or 0/1) at the input's size.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distseg.data.labels import BINARY_REGIONS, BRATS_REGIONS
from distseg.evaluation import CaseFailure, ScoredCase, infer_brats_convention, region_masks
from preprocess.common import CaseError
from preprocess.discover import IMAGE_EXTS, discover_brats, discover_images2d, parse_brats_name
from preprocess.images2d import binarize_mask, load_image
from preprocess.nifti import SourceError, load_nifti

logger = logging.getLogger(__name__)

AFFINE_TOLERANCE_MM = 1e-3
"""Largest difference between prediction and ground-truth affine entries accepted as the same grid."""
NIFTI_SUFFIXES = (".nii.gz", ".nii")
KIND_REGIONS = {"brats3d": list(BRATS_REGIONS), "images2d": list(BINARY_REGIONS)}


class PairingError(Exception):
    """Nothing can be evaluated (missing folder, no ground truth, nothing paired); the message says what was
    expected. Bad single cases are `CaseFailure`s instead."""


@dataclass(frozen=True)
class GroundTruth:
    """One ground-truth label file."""

    case_id: str
    path: Path
    convention: str | None
    """brats2018 / brats2023 from a BraTS case folder's naming; None: decided from the values when read."""


@dataclass
class Pairing:
    """Prediction files matched to ground truth by case id."""

    kind: str
    """brats3d | images2d."""
    pairs: list[tuple[str, Path, GroundTruth]] = field(default_factory=list)
    """(case_id, prediction file, ground truth), sorted by case id."""
    failures: list[CaseFailure] = field(default_factory=list)
    """Cases found but unscorable before reading (duplicate files, discovery problems) and ground-truth cases without
    a prediction: each is scored as failed (worst values), never left out."""
    no_prediction: list[str] = field(default_factory=list)
    """Ground-truth cases without a prediction file (also in `failures`: every ground-truth case counts)."""
    no_ground_truth: list[str] = field(default_factory=list)
    """Prediction files without ground truth (not scored)."""


def _strip_nifti(name: str) -> str | None:
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _walk(root: Path) -> list[Path]:
    out = []
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(files) if not f.startswith("."))
    return out


def find_ground_truth_3d(gt_dir: Path) -> tuple[dict[str, GroundTruth], dict[str, str]]:
    """NIfTI ground truth under `gt_dir` -> ({case_id: GroundTruth}, {case_id: problem})."""
    found: dict[str, GroundTruth] = {}
    problems: dict[str, str] = {}
    for case in discover_brats(gt_dir, warn_unmatched=False):
        if "seg" not in case.files:
            continue
        has_modalities = len(case.files) > 1
        # A lone `<x>_seg.nii.gz` is a plain label file: its name says nothing about the release.
        convention = case.naming if has_modalities or case.naming == "brats2023" else None
        found[case.case_id] = GroundTruth(case.case_id, case.files["seg"], convention)
        if case.problems:
            problems[case.case_id] = "; ".join(case.problems)
    for path in _walk(gt_dir):
        case_id = _strip_nifti(path.name)
        if case_id is None or parse_brats_name(path.name) is not None:
            continue
        if case_id in found:
            problems[case_id] = (f"ground truth for case {case_id!r} given twice: {found[case_id].path} and {path}; "
                                 "expected one label file per case")
            continue
        found[case_id] = GroundTruth(case_id, path, None)
    return found, problems


def find_ground_truth_2d(gt_dir: Path) -> dict[str, GroundTruth]:
    """2D masks under `gt_dir` (the converter's pairing; a mask without its image is still ground truth)."""
    return {c.case_id: GroundTruth(c.case_id, c.files["mask"], None)
            for c in discover_images2d(gt_dir) if "mask" in c.files}


def find_predictions(pred_dir: Path, kind: str) -> dict[str, list[Path]]:
    """Prediction files under `pred_dir` by case id (a list: more than one file for a case id is a problem)."""
    out: dict[str, list[Path]] = {}
    for path in _walk(pred_dir):
        if kind == "brats3d":
            case_id = _strip_nifti(path.name)
        else:
            stem, ext = os.path.splitext(path.name)
            case_id = stem[: -len("_mask")] if ext.lower() in IMAGE_EXTS and stem.lower().endswith("_mask") else None
        if case_id:
            out.setdefault(case_id, []).append(path)
    return out


def pair_label_files(pred_dir: Path, gt_dir: Path) -> Pairing:
    """Pair prediction files with ground truth by case id. Raises PairingError when nothing can be evaluated."""
    for what, d in (("--pred", pred_dir), ("--gt", gt_dir)):
        if not d.is_dir():
            raise PairingError(f"{what} {d}: no such folder; expected a folder of "
                               f"{'prediction files' if what == '--pred' else 'ground-truth label files'}")
    gt3d, problems = find_ground_truth_3d(gt_dir)
    gt2d = find_ground_truth_2d(gt_dir)
    if not gt3d and not gt2d:
        raise PairingError(f"--gt {gt_dir}: no ground truth found; expected BraTS case folders with a seg file, "
                           "<case_id>.nii.gz / <case_id>_seg.nii.gz label files, or 2D masks (masks/X.png, "
                           "X_mask.png)")
    preds = {kind: find_predictions(pred_dir, kind) for kind in ("brats3d", "images2d")}
    candidates = [kind for kind, gt in (("brats3d", gt3d), ("images2d", gt2d)) if gt]
    if len(candidates) > 1:  # both kinds of ground truth: the predictions decide
        candidates = [k for k in candidates if set(preds[k]) & set(gt3d if k == "brats3d" else gt2d)] or candidates
        if len(candidates) > 1:
            raise PairingError(f"--gt {gt_dir}: holds both NIfTI label files and 2D masks matching the predictions; "
                               "expected one kind of ground truth")
    kind = candidates[0]
    gt = gt3d if kind == "brats3d" else gt2d
    pred = preds[kind]
    expected = "<case_id>.nii.gz" if kind == "brats3d" else "<case_id>_mask.png"
    pairing = Pairing(kind)
    for case_id in sorted(set(gt) & set(pred)):
        files = pred[case_id]
        if len(files) > 1:
            pairing.failures.append(CaseFailure(
                case_id, f"prediction for case {case_id!r} given {len(files)} times ({', '.join(map(str, files))}); "
                         "expected one file per case", gt_source=str(gt[case_id].path)))
        elif case_id in problems:
            pairing.failures.append(CaseFailure(case_id, problems[case_id], pred_source=str(files[0]),
                                                gt_source=str(gt[case_id].path)))
        else:
            pairing.pairs.append((case_id, files[0], gt[case_id]))
    pairing.no_prediction = sorted(set(gt) - set(pred))
    pairing.no_ground_truth = sorted(set(pred) - set(gt))
    if not pairing.pairs and not pairing.failures:
        shown = ", ".join(sorted(gt)[:3]) + (", ..." if len(gt) > 3 else "")
        raise PairingError(f"--pred {pred_dir}: no prediction pairs with the {len(gt)} ground-truth cases in {gt_dir}; "
                           f"expected {expected} files named after those cases ({shown})")
    for case_id in pairing.no_prediction:  # every ground-truth case counts: a missing prediction is a failed case
        name = f"{case_id}.nii.gz" if kind == "brats3d" else f"{case_id}_mask.png"
        pairing.failures.append(CaseFailure(
            case_id, f"no prediction for case {case_id!r} in {pred_dir}; expected {name} (scored as failed: Dice 0, "
                     "HD95 penalty)", gt_source=str(gt[case_id].path)))
    if pairing.no_prediction:
        logger.warning("%d ground-truth cases have no prediction in %s and are scored as failed: %s",
                       len(pairing.no_prediction), pred_dir, ", ".join(pairing.no_prediction[:10]))
    if pairing.no_ground_truth:
        logger.warning("%d predictions have no ground truth in %s and are not scored: %s",
                       len(pairing.no_ground_truth), gt_dir, ", ".join(pairing.no_ground_truth[:10]))
    return pairing


@dataclass(frozen=True)
class PairLoader:
    """Reads one prediction/ground-truth pair into region masks (a picklable loader for `evaluate_arrays`)."""

    kind: str
    case_id: str
    pred: Path
    gt: GroundTruth

    def __call__(self) -> ScoredCase | CaseFailure:
        try:
            return self._load_3d() if self.kind == "brats3d" else self._load_2d()
        except (SourceError, CaseError, ValueError) as e:
            return CaseFailure(self.case_id, str(e), pred_source=str(self.pred), gt_source=str(self.gt.path))

    def _arrays(self, pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...] | None,
                convention: str) -> ScoredCase:
        return ScoredCase(self.case_id, pred, gt, spacing, pred_source=str(self.pred),
                          gt_source=str(self.gt.path), label_convention=convention)

    def _load_3d(self) -> ScoredCase:
        pred, _ = load_nifti(self.pred)
        gt, _ = load_nifti(self.gt.path)
        if pred.data.shape != gt.data.shape:
            raise ValueError(f"{self.pred}: shape {pred.data.shape} differs from the ground truth {self.gt.path} "
                             f"{gt.data.shape}; expected the ground truth's voxel grid")
        diff = float(np.abs(pred.affine - gt.affine).max())
        if diff > AFFINE_TOLERANCE_MM:
            raise ValueError(f"{self.pred}: affine differs from the ground truth {self.gt.path} by up to {diff:.4g} "
                             f"mm; expected the same affine (within {AFFINE_TOLERANCE_MM:g} mm)")
        # NIfTI data is (X, Y, Z) in Fortran order; its transpose (Z, Y, X) is a C-contiguous view, which every
        # later pass (value check, region lookup, counts) reads several times faster. Spacing is reversed with it.
        gt_zyx, pred_zyx = gt.data.T, pred.data.T
        convention = self.gt.convention or infer_brats_convention(gt_zyx, pred_zyx)
        gt_masks = region_masks(gt_zyx, convention, BRATS_REGIONS, what=str(self.gt.path))
        pred_masks = region_masks(pred_zyx, convention, BRATS_REGIONS, what=str(self.pred))
        return self._arrays(pred_masks, gt_masks, gt.spacing_xyz[::-1], convention)

    def _load_2d(self) -> ScoredCase:
        pred = load_image(self.pred).max(axis=2)  # white-on-black masks in any colour mode, as the converter
        gt = load_image(self.gt.path).max(axis=2)
        if pred.shape != gt.shape:
            raise ValueError(f"{self.pred}: mask size {pred.shape} differs from the ground truth {self.gt.path} "
                             f"{gt.shape}; expected the input image's size")
        (pred01, _), (gt01, convention) = binarize_mask(pred), binarize_mask(gt)
        return self._arrays(region_masks(pred01, "binary01", BINARY_REGIONS, what=str(self.pred)),
                            region_masks(gt01, "binary01", BINARY_REGIONS, what=str(self.gt.path)), None, convention)
