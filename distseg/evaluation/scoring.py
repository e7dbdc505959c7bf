"""Per-case scoring: label volumes -> region masks -> one metrics row per (case, region); per-subject stacking.

Arrays only (numpy); the metric definitions live in `distseg.metrics`, shared with validation during training, and
`distseg.evaluation.lesionwise` (BraTS 2023 lesion-wise Dice/HD95). Every case gives one row per region: a case
that could not be scored (no prediction, unreadable file, wrong grid) is a "failed" row per region holding the worst
value of every metric, so that means over cases always count every case (the BraTS convention).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distseg.data.labels import BINARY_REGIONS, BRATS_REGIONS, LABEL_CONVENTIONS
from distseg.evaluation.lesionwise import LESION_HD95_PENALTY, lesion_wise
from distseg.metrics import COUNT_COLUMNS, hausdorff95, mask_counts, ratios_from_counts

log = logging.getLogger(__name__)

BRATS_HD95_ONE_EMPTY = 373.13
"""HD95 (mm) the BraTS tooling assigns when exactly one of prediction and ground truth is empty."""

RATIO_METRICS = ("dice", "iou", "accuracy", "precision", "recall", "specificity")
"""Count-based metrics in table order; `recall` is the sensitivity (one name, one column)."""
METRICS = (*RATIO_METRICS, "hd95")
"""Every per-case metric summarised in summary.md and plotted."""
SUBJECT_METRICS = RATIO_METRICS
"""Per-subject metrics: exactly those that stacking counts gives (HD95 needs the stacked geometry)."""
LESION_METRICS = ("lesion_dice", "lesion_hd95")
"""BraTS 2023 lesion-wise Dice and HD95 (`distseg.evaluation.lesionwise`); BraTS 3D evaluations only."""
LESION_COUNTS = ("lesion_tp", "lesion_fn", "lesion_fp")
"""Ground-truth lesions found / missed and false-positive predicted components (the official Num_TP/FN/FP)."""


def case_metrics_of(lesion_wise_metrics: bool) -> tuple[str, ...]:
    """The per-case metrics an evaluation summarises and plots: `METRICS`, + `LESION_METRICS` when computed."""
    return (*METRICS, *LESION_METRICS) if lesion_wise_metrics else METRICS


def default_regions(convention: str) -> dict[str, list[int]]:
    """Regions (name -> canonical label values) for a source convention: BraTS WT/TC/ET, binary "tumour"."""
    if convention not in LABEL_CONVENTIONS:
        raise ValueError(f"unknown label convention {convention!r}; expected one of {sorted(LABEL_CONVENTIONS)}")
    return dict(BRATS_REGIONS) if convention.startswith("brats") else dict(BINARY_REGIONS)


def _label_histogram(label: np.ndarray, what: str) -> np.ndarray:
    """Counts of the values 0..255 in an integer-valued label array; ValueError for anything else."""
    label = np.asarray(label)
    if label.dtype.kind == "b":
        label = label.view(np.uint8)
    elif label.dtype.kind == "f":
        if not np.isfinite(label).all() or not np.array_equal(label, np.round(label)):
            raise ValueError(f"{what}: non-integer label values (dtype {label.dtype}); expected integer labels")
    elif label.dtype.kind not in "iu":
        raise ValueError(f"{what}: label dtype {label.dtype}; expected integers")
    if label.dtype != np.uint8 and label.size and (label.min() < 0 or label.max() > 255):
        outside = np.unique(label[(label < 0) | (label > 255)])[:8]
        raise ValueError(f"{what}: label values {outside.tolist()} outside 0..255")
    return np.bincount(label.astype(np.uint8, copy=False).ravel(), minlength=256)


def infer_brats_convention(*labels: np.ndarray) -> str:
    """BraTS convention from the values present: 4 -> brats2018, 3 -> brats2023, neither -> brats2018 (the regions
    are then the same either way); both -> ValueError."""
    present = np.zeros(256, dtype=bool)
    for label in labels:
        present |= _label_histogram(label, "label") > 0
    if present[3] and present[4]:
        raise ValueError("labels contain both 3 and 4; expected BraTS 2018-2021 {0,1,2,4} or BraTS 2023+ {0,1,2,3}")
    return "brats2023" if present[3] else "brats2018"


def region_masks(label: np.ndarray, convention: str, regions: Mapping[str, Sequence[int]] | None = None,
                 what: str = "label") -> np.ndarray:
    """A label volume in a SOURCE convention -> bool (K, *S) region masks, K = len(regions) in their order.

    label: integer (*S) (2D or 3D) with values of `convention` (`distseg.data.store.LABEL_CONVENTIONS`: brats2018
    {0,1,2,4}, brats2023 {0,1,2,3}, binary255 {0,255}, binary01 {0,1}); regions: name -> CANONICAL values
    (default: WT {1,2,3}, TC {1,3}, ET {3} for BraTS, "tumour" {1} for binary). `what` names the array (a file)
    in errors. Values outside the convention -> ValueError naming them. Labels read from a store are canonical:
    pass "brats2023" (3D, {0,1,2,3}) or "binary01" (2D) for them.
    """
    if convention not in LABEL_CONVENTIONS:
        raise ValueError(f"{what}: unknown label convention {convention!r}; expected one of "
                         f"{sorted(LABEL_CONVENTIONS)}")
    regions = default_regions(convention) if regions is None else regions
    to_canonical = {source: canonical for canonical, source in LABEL_CONVENTIONS[convention].items()}
    present = np.flatnonzero(_label_histogram(label, what))
    unexpected = sorted(set(present.tolist()) - set(to_canonical))
    if unexpected:
        raise ValueError(f"{what}: label values {unexpected} outside the {convention} convention; expected only "
                         f"{sorted(to_canonical)}")
    label8 = np.asarray(label).astype(np.uint8, copy=False)
    masks = np.empty((len(regions), *label8.shape), dtype=bool)
    for k, values in enumerate(regions.values()):
        lut = np.zeros(256, dtype=bool)  # source value -> in this region; one gather per region
        for source, canonical in to_canonical.items():
            lut[source] = canonical in values
        masks[k] = lut[label8]
    return masks


@dataclass
class ScoredCase:
    """One case to score: region masks of prediction and ground truth on one grid."""

    case_id: str
    pred: np.ndarray
    """bool (K, *S) predicted region masks (K regions, S 2D or 3D)."""
    gt: np.ndarray
    """bool (K, *S) ground-truth region masks, same shape."""
    spacing: tuple[float, ...] | None
    """Voxel size in mm per spatial axis (len(S) values); None: pixels (2D images), HD95 in px, no ml."""
    subject: str | None = None
    """Patient the case belongs to (2D slices), for per-subject stacking; None: not known."""
    pred_source: str | None = None
    """Where the prediction came from (a file path), recorded in the row."""
    gt_source: str | None = None
    """Where the ground truth came from."""
    label_convention: str | None = None
    """Source label convention the masks were derived with (brats2018, brats2023, binary01, binary255)."""


@dataclass
class CaseFailure:
    """A case that could not be scored: becomes one failed row with a one-line reason."""

    case_id: str
    error: str
    """One line naming the file(s) and what was expected."""
    subject: str | None = None
    pred_source: str | None = None
    gt_source: str | None = None


CaseItem = ScoredCase | CaseFailure | Callable[[], ScoredCase | CaseFailure]
"""What `evaluate_arrays` scores: a case, a failure, or a zero-argument loader returning one (run in the worker)."""


def _row(case_id: str, region: str | None, status: str, error: str | None, subject: str | None,
         pred_source: str | None, gt_source: str | None, label_convention: str | None = None) -> dict[str, Any]:
    return {"case_id": case_id, "subject": subject, "region": region, "status": status, "error": error,
            "label_convention": label_convention, "pred_source": pred_source, "gt_source": gt_source,
            **dict.fromkeys((*LESION_METRICS, *LESION_COUNTS))}


def failed_rows(failure: CaseFailure, region_names: Sequence[str], one_empty_hd95: float = BRATS_HD95_ONE_EMPTY,
                lesion_wise_metrics: bool = False) -> list[dict[str, Any]]:
    """The rows of a case that was not scored, one per region: status "failed", `error` says why, and the worst
    value of every metric (BraTS convention: a missing or failed segmentation scores Dice 0 and the HD95 penalty):
    every ratio 0, hd95 `one_empty_hd95`, lesion-wise Dice 0 / HD95 374 (when computed); counts and volumes null."""
    rows = []
    for region in region_names:
        row = _row(failure.case_id, str(region), "failed", failure.error, failure.subject, failure.pred_source,
                   failure.gt_source)
        row.update(dict.fromkeys(RATIO_METRICS, 0.0), hd95=float(one_empty_hd95))
        if lesion_wise_metrics:
            row.update(lesion_dice=0.0, lesion_hd95=LESION_HD95_PENALTY)
        rows.append(row)
    return rows


def evaluate_case(pred_masks: np.ndarray, gt_masks: np.ndarray, spacing: Sequence[float] | None,
                  region_names: Sequence[str], *, case_id: str = "", subject: str | None = None,
                  empty_value: float = 1.0, one_empty_hd95: float = BRATS_HD95_ONE_EMPTY,
                  pred_source: str | None = None, gt_source: str | None = None,
                  label_convention: str | None = None, lesion_wise_metrics: bool = False) -> list[dict[str, Any]]:
    """Score one case: one row per region with dice, iou, accuracy, precision, recall (= sensitivity),
    specificity, hd95, pred/gt voxels and ml, and the raw tp/fp/fn/tn counts; with `lesion_wise_metrics` also the
    BraTS 2023 lesion-wise lesion_dice, lesion_hd95 and lesion_tp/fn/fp (`distseg.evaluation.lesionwise`; null
    otherwise).

    pred_masks, gt_masks: bool (K, *S), S 2D or 3D, K = len(region_names). spacing: mm per spatial axis, or None
    for images without a physical size (HD95 in pixels, ml null). Counts cover every voxel of the grid. BraTS
    conventions: both empty -> Dice 1 (every ratio with a zero denominator takes `empty_value`), HD95 0; exactly one
    empty -> Dice 0, HD95 `one_empty_hd95`.
    """
    pred, gt = np.asarray(pred_masks, dtype=bool), np.asarray(gt_masks, dtype=bool)
    if pred.shape != gt.shape or pred.ndim not in (3, 4):
        raise ValueError(f"case {case_id!r}: prediction masks {pred.shape} and ground-truth masks {gt.shape} must "
                         "have one shape (K, *S) with 2 or 3 spatial axes")
    if len(region_names) != pred.shape[0]:
        raise ValueError(f"case {case_id!r}: {len(region_names)} region names {list(region_names)} for "
                         f"{pred.shape[0]} mask channels")
    if spacing is not None and (len(spacing) != pred.ndim - 1 or not all(float(s) > 0 for s in spacing)):
        raise ValueError(f"case {case_id!r}: spacing {tuple(spacing)}; expected {pred.ndim - 1} positive values (mm)")
    counts = mask_counts(pred, gt)
    ratios = ratios_from_counts(counts, empty_value)
    ml_per_voxel = None if spacing is None else math.prod(float(s) for s in spacing) / 1000.0
    rows = []
    for k, region in enumerate(region_names):
        row = _row(case_id, str(region), "ok", None, subject, pred_source, gt_source, label_convention)
        row.update({metric: float(ratios[metric][k]) for metric in RATIO_METRICS})
        row["hd95"] = hausdorff95(pred[k], gt[k], spacing, one_empty=one_empty_hd95)
        tp, fp, fn, tn = (int(c) for c in counts[k])
        row.update(pred_voxels=tp + fp, gt_voxels=tp + fn)
        row["pred_ml"] = None if ml_per_voxel is None else (tp + fp) * ml_per_voxel
        row["gt_ml"] = None if ml_per_voxel is None else (tp + fn) * ml_per_voxel
        row.update(zip(COUNT_COLUMNS, (tp, fp, fn, tn), strict=True))
        if lesion_wise_metrics:
            lw = lesion_wise(pred[k], gt[k], spacing, whole_hd95=row["hd95"])
            row.update(lesion_dice=lw.dice, lesion_hd95=lw.hd95, lesion_tp=lw.tp, lesion_fn=lw.fn, lesion_fp=lw.fp)
        rows.append(row)
    return rows


def subject_metrics(rows: Sequence[Mapping[str, Any]], empty_value: float = 1.0) -> list[dict[str, Any]]:
    """Per-subject metrics from per-case rows: the tp/fp/fn/tn of a subject's ok cases (e.g. the slices of one
    patient) are summed per region, so the ratios are exactly those of the stacked volume. Rows without a subject
    are left out; returns [] when none has one. Columns: subject, region, n_cases (ok cases stacked), n_failed,
    tp, fp, fn, tn, pred_voxels, gt_voxels (sums over the ok cases) and `SUBJECT_METRICS`. A failed case has no
    counts, so its subject's stacked volume is unknown: a subject with any failed case scores the worst value, 0,
    in every metric (as a failed case does), never the ratios of its remaining cases."""
    sums: dict[tuple[str, str], list[int]] = {}
    failed: dict[tuple[str, str], int] = {}
    for row in rows:
        if row.get("subject") is None:
            continue
        if row.get("status") != "ok":
            if row.get("region") is not None:
                key = (str(row["subject"]), str(row["region"]))
                failed[key] = failed.get(key, 0) + 1
            continue
        acc = sums.setdefault((str(row["subject"]), str(row["region"])), [0, 0, 0, 0, 0])
        for i, col in enumerate(COUNT_COLUMNS):
            acc[i] += int(row[col])
        acc[4] += 1
    for key in failed:
        sums.setdefault(key, [0, 0, 0, 0, 0])
    if not sums:
        return []
    keys = list(sums)
    counts = np.asarray([sums[k][:4] for k in keys], dtype=np.int64)
    ratios = ratios_from_counts(counts, empty_value)
    out = []
    for i, (subject, region) in enumerate(keys):
        tp, fp, fn, tn = (int(c) for c in counts[i])
        row = {"subject": subject, "region": region, "n_cases": sums[(subject, region)][4],
               "n_failed": failed.get((subject, region), 0),
               "tp": tp, "fp": fp, "fn": fn, "tn": tn, "pred_voxels": tp + fp, "gt_voxels": tp + fn}
        row.update({metric: 0.0 if row["n_failed"] else float(ratios[metric][i]) for metric in SUBJECT_METRICS})
        out.append(row)
    return sorted(out, key=lambda r: r["subject"])


def score_item(item: CaseItem, region_names: Sequence[str], empty_value: float = 1.0,
               one_empty_hd95: float = BRATS_HD95_ONE_EMPTY, lesion_wise_metrics: bool = False
               ) -> list[dict[str, Any]]:
    """Rows for one `CaseItem`; a loader is called first. Never raises for a bad case: it becomes failed rows (one
    per region, see `failed_rows`). The masks are dropped when this returns: only rows are kept."""
    def failed(failure: CaseFailure) -> list[dict[str, Any]]:
        return failed_rows(failure, region_names, one_empty_hd95, lesion_wise_metrics)

    if callable(item):
        try:
            item = item()
        except Exception as e:  # a loader should return CaseFailure; anything unforeseen still becomes a row
            log.exception("case loader %r failed", item)
            return failed(CaseFailure(getattr(item, "case_id", "?"), f"{type(e).__name__}: {e}"))
    if isinstance(item, CaseFailure):
        return failed(item)
    try:
        return evaluate_case(item.pred, item.gt, item.spacing, region_names, case_id=item.case_id,
                             subject=item.subject, empty_value=empty_value, one_empty_hd95=one_empty_hd95,
                             pred_source=item.pred_source, gt_source=item.gt_source,
                             label_convention=item.label_convention, lesion_wise_metrics=lesion_wise_metrics)
    except ValueError as e:
        return failed(CaseFailure(item.case_id, str(e), item.subject, item.pred_source, item.gt_source))
