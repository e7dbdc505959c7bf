"""BraTS 2023 lesion-wise Dice and HD95 of one region (WT, TC or ET) of one case.

The definition is the one of the BraTS 2023 challenge's own scoring code (rachitsaluja/BraTS-2023-Metrics,
`get_LesionWiseScores` / `get_LesionWiseResults`, glioma settings), restated here:

1. Ground-truth lesions: the ground truth is dilated (`scipy.ndimage.binary_dilation`, the rank-n connectivity-2
   structure, i.e. 18-connected in 3D, `dilation` = 3 iterations) and split into 26-connected components (8 in
   2D). A lesion is the set of UNDILATED ground-truth voxels inside one dilated component, so ground-truth pieces
   within 2 x 3 voxels of each other form one lesion; the dilated component is the lesion's catchment.
2. Predicted components: 26-connected components of the prediction. A component matches a lesion when it
   touches the lesion's catchment (dilated component). One component may match several lesions.
3. Per lesion: the union of its matching components vs the lesion's undilated voxels -> Dice and HD95 (a lesion no
   component matches: Dice 0, HD95 `penalty`). Lesions of volume <= `min_volume` (mm^3: voxels x voxel volume, as
   the official code; = voxels at BraTS' 1 mm) are dropped from the score, and the components matching them are
   neither true nor false positives.
4. False positives: components that match no lesion (any size); each scores Dice 0, HD95 `penalty`.
5. Score: sum over the kept lesions / (kept lesions + false positives), for Dice and HD95 (false positives add
   `penalty` each to the HD95 sum). Nothing to count (no kept lesion, no false positive): Dice 1, HD95 0.

One deliberate difference: the per-lesion HD95 is `distseg.metrics.hausdorff95` (MedPy / BraTS-legacy: 95th
percentile of the pooled distances between the voxel surfaces), the one HD95 of this project, where the official
script uses DeepMind's `surface_distance.compute_robust_hausdorff` (the larger of the two directed, surfel-area
weighted 95th percentiles). Both are 0 for identical masks; for matched lesions they differ by a fraction of a
voxel to about a voxel. Counts, matching, Dice, penalties and the aggregation are the official ones.

Pure functions on bool numpy arrays (2D or 3D) and a spacing; the work is done on the box of prediction and ground
truth grown by the dilation (+1 voxel for the surfaces), so its cost follows the tumour, not the scan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from distseg.metrics import foreground_box, hausdorff95

LESION_DILATION = 3
"""Voxels the ground truth is dilated by to merge nearby pieces into one lesion (BraTS 2023 glioma, SSA, PED)."""
LESION_MIN_VOLUME = 50.0
"""Ground-truth lesions of at most this volume (mm^3) are not scored (BraTS 2023 glioma)."""
LESION_HD95_PENALTY = 374.0
"""HD95 (mm) of a missed lesion and of a false-positive component (BraTS 2023)."""


@dataclass(frozen=True)
class LesionScore:
    """One kept ground-truth lesion."""

    volume: float
    """Undilated volume in mm^3 (voxels without a spacing)."""
    dice: float
    """Dice of the lesion's voxels vs the union of its matching predicted components (0 when none)."""
    hd95: float
    """HD95 between them (the penalty when no component matches)."""
    n_matched: int
    """Predicted components touching the lesion's catchment."""


@dataclass(frozen=True)
class LesionWiseResult:
    """Lesion-wise scores of one region of one case (official names in brackets)."""

    dice: float
    """[LesionWise_Score_Dice] sum of kept lesions' Dice / (kept lesions + false positives); 1 when both are 0."""
    hd95: float
    """[LesionWise_Score_HD95] (sum of kept lesions' HD95 + penalty x false positives) / (same); 0 when both are 0."""
    tp: int
    """[Num_TP] kept ground-truth lesions matched by at least one predicted component."""
    fn: int
    """[Num_FN] kept ground-truth lesions that no predicted component touches."""
    fp: int
    """[Num_FP] predicted components touching no ground-truth lesion (small dropped ones included)."""
    lesions: tuple[LesionScore, ...] = ()
    """The kept lesions, in label order."""
    n_dropped: int = 0
    """Ground-truth lesions dropped as too small (<= min_volume)."""


def _check(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape or pred.ndim not in (2, 3):
        raise ValueError(f"lesion-wise metrics: prediction {pred.shape} and ground truth {gt.shape} must be one 2D or "
                         "3D shape")
    if spacing is not None and (len(spacing) != pred.ndim or not all(float(s) > 0 for s in spacing)):
        raise ValueError(f"lesion-wise metrics: spacing {tuple(spacing)}; expected {pred.ndim} positive values (mm)")
    return pred, gt


def gt_lesions(gt: np.ndarray, dilation: int = LESION_DILATION) -> tuple[np.ndarray, int]:
    """Ground-truth lesions: the labels (1..n) of the components of `gt` dilated by `dilation` voxels, on the whole
    grid (the catchments; the lesion's own voxels are ``gt & (labels == i)``), and n.

    gt: bool (*S), 2D or 3D. Dilation: rank-n connectivity-2 structure (18-neighbourhood in 3D, 8 in 2D), iterated
    `dilation` times; components: full connectivity (26 in 3D, 8 in 2D). Returns int32 (*S) labels and n."""
    gt = np.asarray(gt, dtype=bool)
    grown = gt
    if dilation > 0 and gt.any():
        grown = ndimage.binary_dilation(gt, ndimage.generate_binary_structure(gt.ndim, 2), iterations=dilation)
    labels, n = ndimage.label(grown, ndimage.generate_binary_structure(gt.ndim, gt.ndim))
    return labels.astype(np.int32, copy=False), int(n)


def _pair_counts(a: np.ndarray, b: np.ndarray, n_b: int) -> dict[tuple[int, int], int]:
    """{(a, b): voxels} over the voxels where both label arrays are non-zero."""
    both = (a > 0) & (b > 0)
    keys, counts = np.unique(a[both].astype(np.int64) * (n_b + 1) + b[both], return_counts=True)
    return {(int(k) // (n_b + 1), int(k) % (n_b + 1)): int(c) for k, c in zip(keys, counts, strict=True)}


def _union_box(boxes: Sequence[tuple[slice, ...]], shape: tuple[int, ...], margin: int) -> tuple[slice, ...]:
    return tuple(slice(max(min(b[d].start for b in boxes) - margin, 0),
                       min(max(b[d].stop for b in boxes) + margin, shape[d])) for d in range(len(shape)))


def lesion_wise(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None, *,
                dilation: int = LESION_DILATION, min_volume: float = LESION_MIN_VOLUME,
                penalty: float = LESION_HD95_PENALTY, whole_hd95: float | None = None) -> LesionWiseResult:
    """BraTS 2023 lesion-wise Dice and HD95 of one region (see the module doc for the definition).

    pred, gt: bool (*S) masks of one region (2D or 3D); spacing: mm per axis in the arrays' axis order (None:
    1 per axis, volumes in voxels and HD95 in voxels). dilation: voxels; min_volume: mm^3; penalty: HD95 of a missed
    lesion or a false-positive component (mm). whole_hd95: `hausdorff95(pred, gt, spacing)` when the caller has it
    already (`evaluate_case` does): a lesion that is the whole of both masks (one lesion, every component matched to
    it: the usual good prediction) then costs no second pair of distance transforms."""
    pred, gt = _check(pred, gt, spacing)
    voxel_volume = 1.0 if spacing is None else math.prod(float(s) for s in spacing)
    # Everything happens within `dilation` (catchments) + 1 (surfaces, see `hausdorff95`) voxels of pred | gt: on
    # that box the components, catchments and surfaces are those of the whole grid.
    box = foreground_box(pred | gt, margin=dilation + 1)
    if box is None:
        return LesionWiseResult(1.0, 0.0, 0, 0, 0)
    pred, gt = pred[box], gt[box]
    # Catchments lie within `dilation` voxels of the ground truth: dilate and label only there (false positives
    # spread over the brain make the outer box much larger than the tumour's).
    catchment = np.zeros(gt.shape, dtype=np.int32)
    gt_box = foreground_box(gt, margin=dilation + 1)
    n_lesions = 0
    if gt_box is not None:
        catchment[gt_box], n_lesions = gt_lesions(gt[gt_box], dilation)
    lesion = np.where(gt, catchment, 0)  # each undilated ground-truth voxel labelled by its lesion
    full = ndimage.generate_binary_structure(pred.ndim, pred.ndim)
    components, n_components = ndimage.label(pred, full)
    component_size = np.bincount(components.ravel(), minlength=n_components + 1)
    lesion_size = np.bincount(lesion.ravel(), minlength=n_lesions + 1)
    touching = _pair_counts(catchment, components, n_components)  # (lesion, component) -> voxels of the catchment
    overlap = _pair_counts(lesion, components, n_components)  # (lesion, component) -> voxels of the lesion itself
    matched: dict[int, list[int]] = {}
    for i, c in touching:
        matched.setdefault(i, []).append(c)
    lesion_boxes = ndimage.find_objects(lesion)
    component_boxes = ndimage.find_objects(components)
    scores, dropped = [], 0
    for i in range(1, n_lesions + 1):
        volume = float(lesion_size[i]) * voxel_volume
        if volume <= min_volume:
            dropped += 1
            continue
        hits = matched.get(i, [])
        if not hits:
            scores.append(LesionScore(volume, 0.0, float(penalty), 0))
            continue
        inter = sum(overlap.get((i, c), 0) for c in hits)
        dice = 2.0 * inter / (float(lesion_size[i]) + float(component_size[hits].sum()))
        if whole_hd95 is not None and n_lesions == 1 and len(hits) == n_components:
            hd = float(whole_hd95)  # the lesion is all of gt and its components all of pred
        else:
            sub = _union_box([lesion_boxes[i - 1], *(component_boxes[c - 1] for c in hits)], pred.shape, margin=1)
            hd = hausdorff95(np.isin(components[sub], hits), lesion[sub] == i, spacing, one_empty=penalty)
        scores.append(LesionScore(volume, dice, hd, len(hits)))
    n_fp = n_components - len({c for _, c in touching})
    n_kept = len(scores)
    if n_kept + n_fp == 0:
        dice_score, hd_score = 1.0, 0.0
    else:
        dice_score = sum(s.dice for s in scores) / (n_kept + n_fp)
        hd_score = (sum(s.hd95 for s in scores) + n_fp * float(penalty)) / (n_kept + n_fp)
    tp = sum(1 for s in scores if s.n_matched)
    return LesionWiseResult(dice_score, hd_score, tp, n_kept - tp, n_fp, tuple(scores), dropped)
