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
from scipy import ndimage

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
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, iterations=1)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Distances (in spacing units, e.g. mm) from every surface voxel of `a` to the nearest surface voxel of `b`."""
    spacing = _check_spacing(spacing, a.ndim)
    dist_to_b = ndimage.distance_transform_edt(~surface(b), sampling=spacing)
    return dist_to_b[surface(a)]


def hausdorff95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None,
                one_empty: float = math.inf) -> float:
    """95th percentile of the symmetric surface distances (MedPy `hd95` / BraTS), in the units of `spacing`.

    pred, gt: boolean (*S) masks (2D or 3D); spacing: voxel size per axis (default 1). Both empty -> 0.0; exactly
    one empty -> `one_empty` (default inf).
    """
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"hausdorff95: pred {pred.shape} and gt {gt.shape} must have the same shape")
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 0.0
    if not has_pred or not has_gt:
        return float(one_empty)
    distances = np.concatenate([surface_distances(pred, gt, spacing), surface_distances(gt, pred, spacing)])
    return float(np.percentile(distances, 95))


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
    counts = confusion_counts_from_masks(torch.from_numpy(pred[None]), torch.from_numpy(gt[None]))
    out: dict[str, float] = {}
    for metric, fn in RATIOS.items():
        for name, value in zip(names, fn(counts, empty_value).tolist(), strict=True):
            out[f"{metric}/{name}"] = value
    for k, name in enumerate(names):
        out[f"hd95/{name}"] = hausdorff95(pred[k], gt[k], spacing, one_empty=one_empty_hd95)
    return out
