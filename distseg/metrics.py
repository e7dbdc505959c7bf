"""Segmentation metrics: on-device confusion counts for training/validation, per-case numpy metrics for evaluation.

Training/validation: `confusion_counts` gives a (K, 4) float64 tensor of (tp, fp, fn, tn) per channel without leaving
the device; `MetricAccumulator` sums them and all-reduces once at aggregate time, so the Dice of a validation pass
is computed from global counts (nnU-Net), never by averaging per-rank or per-batch ratios.

Conventions for empty sets (stated once, used everywhere):
- A ratio whose denominator is 0 (e.g. Dice when ground truth and prediction are both empty) takes ``empty_value``,
  default 1.0: there was nothing to find and nothing was wrongly found. This is the BraTS challenge convention;
  nnU-Net's evaluation instead reports NaN for such cases and leaves them out of means (pass ``empty_value=nan``).
- Hausdorff95: both masks empty -> 0.0; exactly one empty -> ``inf`` (no surface to measure to). BraTS' tooling
  substitutes a fixed penalty (373.13 mm) for the latter; callers that want it can pass ``one_empty=373.13``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

COUNT_COLUMNS = ("tp", "fp", "fn", "tn")
RATIO_NAMES = ("dice", "iou", "precision", "recall", "specificity", "accuracy")


# --------------------------------------------------------------------------------------------- on-device counts
def confusion_counts_from_masks(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Boolean masks pred, target (B, K, *S) -> (K, 4) float64 counts (tp, fp, fn, tn) summed over batch and space."""
    if pred.shape != target.shape or pred.ndim < 3:
        raise ValueError(f"confusion counts: pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be "
                         "(B, K, *S)")
    pred, target = pred.bool(), target.bool()
    axes = (0, *range(2, pred.ndim))
    tp = (pred & target).sum(axes)
    fp = (pred & ~target).sum(axes)
    fn = (~pred & target).sum(axes)
    total = pred.numel() // pred.shape[1]
    # int64 sums are exact; float64 keeps them exact up to 2^53 voxels and lets gloo/NCCL all-reduce them.
    return torch.stack([tp, fp, fn, total - tp - fp - fn], dim=1).to(torch.float64)


def confusion_counts(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Sigmoid-threshold predictions vs targets -> (K, 4) float64 (tp, fp, fn, tn) per channel, on logits' device.

    logits (B, K, *S) raw scores; targets (B, K, *S) in {0, 1} (any dtype). Prediction = sigmoid(logit) > threshold,
    evaluated as logit > log(t / (1 - t)) so no sigmoid is computed. No host sync.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"confusion counts: threshold must be in (0, 1), got {threshold!r}")
    if logits.shape != targets.shape:
        raise ValueError(f"confusion counts: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ; "
                         "expected both (B, K, *S)")
    cut = math.log(threshold / (1.0 - threshold))
    return confusion_counts_from_masks(logits > cut, targets > 0.5)


def _ratio(num: torch.Tensor, den: torch.Tensor, empty_value: float) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, empty_value))


def dice_from_counts(counts: torch.Tensor, empty_value: float = 1.0) -> torch.Tensor:
    """(K, 4) counts -> (K,) Dice = 2tp / (2tp + fp + fn); ``empty_value`` where GT and prediction are both empty."""
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    return _ratio(2 * tp, 2 * tp + fp + fn, empty_value)


def iou_from_counts(counts: torch.Tensor, empty_value: float = 1.0) -> torch.Tensor:
    """(K, 4) -> (K,) IoU (Jaccard) = tp / (tp + fp + fn)."""
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    return _ratio(tp, tp + fp + fn, empty_value)


def precision_from_counts(counts: torch.Tensor, empty_value: float = 1.0) -> torch.Tensor:
    """(K, 4) -> (K,) precision = tp / (tp + fp) (``empty_value`` when nothing is predicted)."""
    return _ratio(counts[..., 0], counts[..., 0] + counts[..., 1], empty_value)


def recall_from_counts(counts: torch.Tensor, empty_value: float = 1.0) -> torch.Tensor:
    """(K, 4) -> (K,) recall / sensitivity = tp / (tp + fn) (``empty_value`` when the GT is empty)."""
    return _ratio(counts[..., 0], counts[..., 0] + counts[..., 2], empty_value)


def specificity_from_counts(counts: torch.Tensor, empty_value: float = 1.0) -> torch.Tensor:
    """(K, 4) -> (K,) specificity = tn / (tn + fp)."""
    return _ratio(counts[..., 3], counts[..., 3] + counts[..., 1], empty_value)


def accuracy_from_counts(counts: torch.Tensor, empty_value: float = 1.0) -> torch.Tensor:
    """(K, 4) -> (K,) pixel accuracy = (tp + tn) / all."""
    return _ratio(counts[..., 0] + counts[..., 3], counts.sum(-1), empty_value)


RATIOS = {
    "dice": dice_from_counts,
    "iou": iou_from_counts,
    "precision": precision_from_counts,
    "recall": recall_from_counts,
    "specificity": specificity_from_counts,
    "accuracy": accuracy_from_counts,
}


class MetricAccumulator:
    """Sums per-batch (K, 4) counts on the device; `compute()` all-reduces ONCE and derives the ratios.

    Every rank must call `compute()` (it is a collective when torch.distributed is initialised); single-process it
    just reads the local sum. `names` label the K channels (e.g. ["WT", "TC", "ET"]).
    """

    def __init__(self, names: Sequence[str], group: dist.ProcessGroup | None = None) -> None:
        self.names = list(names)
        self.group = group
        self._total: torch.Tensor | None = None
        self.batches = 0

    def update(self, counts: torch.Tensor) -> None:
        """Add one batch's (K, 4) counts (stays on the device; no sync)."""
        if counts.shape != (len(self.names), 4):
            raise ValueError(f"metric accumulator: expected counts of shape ({len(self.names)}, 4) for channels "
                             f"{self.names}, got {tuple(counts.shape)}")
        counts = counts.to(torch.float64)
        self._total = counts.clone() if self._total is None else self._total + counts
        self.batches += 1

    def reset(self) -> None:
        self._total = None
        self.batches = 0

    def counts(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The (K, 4) counts summed over batches and, when distributed, over ranks (one all_reduce).

        A rank that saw no batch contributes zeros on ``device`` (default CPU), so the collective stays symmetric.
        """
        total = self._total
        if total is None:
            total = torch.zeros(len(self.names), 4, dtype=torch.float64, device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            total = total.clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    def compute(self, empty_value: float = 1.0, device: torch.device | str | None = None) -> dict[str, float]:
        """All-reduced ratios as ``{"<metric>/<channel>": value, "<metric>/mean": mean over channels}``."""
        counts = self.counts(device).cpu()
        out: dict[str, float] = {}
        for metric, fn in RATIOS.items():
            values = fn(counts, empty_value)
            for name, value in zip(self.names, values.tolist(), strict=True):
                out[f"{metric}/{name}"] = value
            out[f"{metric}/mean"] = float(values.mean())
        return out


# --------------------------------------------------------------------------------------------- per-case (numpy)
def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or any(not s > 0 for s in spacing):
        raise ValueError(f"spacing: expected {ndim} positive values (one per spatial axis), got {spacing}")
    return spacing


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface voxels of a mask: foreground voxels with a face-neighbour (connectivity 1) in the background;
    voxels on the array border count as surface (as in MedPy)."""
    from scipy import ndimage  # not at import: every training rank imports this module

    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, iterations=1)


def foreground_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Bounding box of the True voxels grown by `margin` voxels per side, clipped to the array; None when empty."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _crop_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to the box of a | b grown by one voxel (clipped to the array). Exact for surfaces and
    surface distances: outside the box both masks are background, so a foreground voxel has the same face
    neighbours in the crop (the grown voxel is background, as in the full array; where the box meets the array
    border, the border stays the border and its voxels stay surface), and every surface voxel of either mask lies
    inside, so nearest-surface distances are unchanged. Tested equal to the uncropped result."""
    box = foreground_box(a | b, margin=1)
    return (a, b) if box is None else (a[box], b[box])


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Distances (in spacing units, e.g. mm) from every surface voxel of `a` to the nearest surface voxel of `b`.

    a, b: boolean (*S) masks of one shape; `b` must not be empty when `a` is not.
    """
    from scipy import ndimage  # not at import: every training rank imports this module

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    spacing = _check_spacing(spacing, a.ndim)
    a, b = _crop_pair(a, b)
    dist_to_b = ndimage.distance_transform_edt(~surface(b), sampling=spacing)
    return dist_to_b[surface(a)]


def hausdorff95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None,
                one_empty: float = math.inf) -> float:
    """95th percentile of the symmetric surface distances (MedPy `hd95` / BraTS), in the units of `spacing`.

    pred, gt: boolean (*S) masks (2D or 3D); spacing: voxel size per axis (default 1). Both directions (pred -> gt
    and gt -> pred) are pooled before taking the percentile, as MedPy and the BraTS tooling do (MONAI instead takes
    the larger of the two directed percentiles). Both empty -> 0.0; exactly one empty -> `one_empty` (default inf).
    Computed on the box of pred | gt grown by one voxel (see `_crop_pair`): the same value as on the whole array,
    at the cost of the tumour's box instead of the scan's (two EDTs of a 240x240x155 volume take seconds).
    """
    from scipy import ndimage  # not at import: every training rank imports this module

    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"hausdorff95: pred {pred.shape} and gt {gt.shape} must have the same shape")
    spacing = _check_spacing(spacing, pred.ndim)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 0.0
    if not has_pred or not has_gt:
        return float(one_empty)
    pred, gt = _crop_pair(pred, gt)
    pred_surface, gt_surface = surface(pred), surface(gt)
    pred_to_gt = ndimage.distance_transform_edt(~gt_surface, sampling=spacing)[pred_surface]
    gt_to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[gt_surface]
    return float(np.percentile(np.concatenate([pred_to_gt, gt_to_pred]), 95))


def mask_counts(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Boolean (K, *S) masks -> (K, 4) int64 counts (tp, fp, fn, tn) per channel (numpy twin of
    `confusion_counts_from_masks` for one case; the ratios come from the same `RATIOS` functions)."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape or pred.ndim < 2:
        raise ValueError(f"mask counts: pred {pred.shape} and gt {gt.shape} must both be (K, *S)")
    flat_p, flat_g = pred.reshape(pred.shape[0], -1), gt.reshape(gt.shape[0], -1)
    tp = np.count_nonzero(flat_p & flat_g, axis=1)
    n_pred, n_gt = np.count_nonzero(flat_p, axis=1), np.count_nonzero(flat_g, axis=1)
    fp, fn = n_pred - tp, n_gt - tp
    return np.stack([tp, fp, fn, flat_p.shape[1] - tp - fp - fn], axis=1).astype(np.int64)


def ratios_from_counts(counts: np.ndarray | torch.Tensor, empty_value: float = 1.0) -> dict[str, np.ndarray]:
    """(..., 4) counts (tp, fp, fn, tn) -> ``{metric: float64 array (...)}`` for every metric in `RATIOS`."""
    counts = torch.as_tensor(np.asarray(counts, dtype=np.float64))
    return {metric: fn(counts, empty_value).numpy() for metric, fn in RATIOS.items()}


def case_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None,
                 names: Sequence[str] | None = None, empty_value: float = 1.0,
                 one_empty_hd95: float = math.inf) -> dict[str, float]:
    """All metrics for one case. pred, gt: boolean (K, *S) with S 2D or 3D (pass mask[None] for one channel);
    spacing: voxel size per spatial axis (len(S) values; default 1).

    Returns ``{"<metric>/<channel>": value}`` for dice, iou, precision, recall, specificity, accuracy, hd95
    (hd95 in spacing units, mm for NIfTI-derived spacing). Channel names default to "0", "1", ...
    """
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape or pred.ndim not in (3, 4):
        raise ValueError(f"case metrics: pred {pred.shape} and gt {gt.shape} must have the same shape (K, *S) "
                         "with 2 or 3 spatial axes")
    _check_spacing(spacing, pred.ndim - 1)
    names = [str(i) for i in range(pred.shape[0])] if names is None else list(names)
    if len(names) != pred.shape[0]:
        raise ValueError(f"case metrics: {len(names)} channel names {names} for {pred.shape[0]} channels")
    out: dict[str, float] = {}
    for metric, values in ratios_from_counts(mask_counts(pred, gt), empty_value).items():
        for name, value in zip(names, values.tolist(), strict=True):
            out[f"{metric}/{name}"] = value
    for k, name in enumerate(names):
        out[f"hd95/{name}"] = hausdorff95(pred[k], gt[k], spacing, one_empty=one_empty_hd95)
    return out
