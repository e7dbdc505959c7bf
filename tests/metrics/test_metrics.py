"""Metrics: device counts and ratios vs direct numpy computations; HD95 vs brute force with anisotropic spacing."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from distseg.metrics import (
    RATIOS,
    MetricAccumulator,
    case_metrics,
    confusion_counts,
    dice_from_counts,
    hausdorff95,
    iou_from_counts,
)


def _numpy_ratios(p: np.ndarray, g: np.ndarray) -> dict[str, float]:
    """Direct definitions on boolean arrays, with 0/0 -> 1 (the documented convention)."""
    def r(a: float, b: float) -> float:
        return 1.0 if b == 0 else a / b
    inter, union = np.logical_and(p, g).sum(), np.logical_or(p, g).sum()
    return {
        "dice": r(2 * inter, p.sum() + g.sum()),
        "iou": r(inter, union),
        "precision": r(inter, p.sum()),
        "recall": r(inter, g.sum()),
        "specificity": r(np.logical_and(~p, ~g).sum(), (~g).sum()),
        "accuracy": r((p == g).sum(), p.size),
    }


@pytest.mark.parametrize("spatial", [(9, 11), (5, 6, 7)])
def test_counts_and_ratios_match_numpy(rng: np.random.Generator, spatial: tuple[int, ...]) -> None:
    logits = rng.normal(size=(3, 4, *spatial)).astype(np.float32)
    targets = rng.random((3, 4, *spatial)) < rng.random((1, 4) + (1,) * len(spatial))
    counts = confusion_counts(torch.from_numpy(logits), torch.from_numpy(targets).float(), threshold=0.3)
    assert counts.dtype == torch.float64 and counts.shape == (4, 4)
    pred = 1 / (1 + np.exp(-logits)) > 0.3
    for k in range(4):
        p, g = pred[:, k], targets[:, k]
        assert counts[k].tolist() == [(p & g).sum(), (p & ~g).sum(), (~p & g).sum(), (~p & ~g).sum()]
        expected = _numpy_ratios(p, g)
        for name, fn in RATIOS.items():
            assert fn(counts)[k].item() == pytest.approx(expected[name], rel=1e-12), name


def test_empty_conventions() -> None:
    empty = torch.zeros(1, 2, 4, 4)
    counts = confusion_counts(torch.full((1, 2, 4, 4), -5.0), empty)
    assert dice_from_counts(counts).tolist() == [1.0, 1.0]
    assert iou_from_counts(counts).tolist() == [1.0, 1.0]
    assert torch.isnan(dice_from_counts(counts, empty_value=math.nan)).all()
    # Prediction where the GT is empty: Dice 0, not 1.
    counts = confusion_counts(torch.full((1, 2, 4, 4), 5.0), empty)
    assert dice_from_counts(counts).tolist() == [0.0, 0.0]


def _brute_surface(mask: np.ndarray) -> np.ndarray:
    """Surface by definition: a foreground voxel with a face neighbour that is background or outside the array."""
    out = np.zeros_like(mask)
    for idx in zip(*np.nonzero(mask), strict=True):
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            nb = list(idx)
            nb[axis] += step
            if not 0 <= nb[axis] < mask.shape[axis] or not mask[tuple(nb)]:
                out[idx] = True
                break
    return out


def _brute_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> float:
    pa = np.argwhere(_brute_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(_brute_surface(b)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


@pytest.mark.parametrize(
    ("shape", "spacing"), [((12, 15), (0.7, 2.5)), ((6, 9, 8), (3.0, 1.0, 0.5)), ((7, 7, 10), (1.0, 1.0, 1.0))]
)
def test_hd95_matches_brute_force(rng: np.random.Generator, shape: tuple[int, ...],
                                  spacing: tuple[float, ...]) -> None:
    for _ in range(4):
        a = rng.random(shape) < rng.uniform(0.05, 0.5)
        b = rng.random(shape) < rng.uniform(0.05, 0.5)
        a.flat[0] = b.flat[-1] = True  # never empty
        assert hausdorff95(a, b, spacing) == pytest.approx(_brute_hd95(a, b, spacing), rel=1e-9)
        assert hausdorff95(a, b, spacing) == pytest.approx(hausdorff95(b, a, spacing))


def test_hd95_spacing_scales_distances() -> None:
    a = np.zeros((20, 20), bool)
    b = np.zeros((20, 20), bool)
    a[5:8, 5:8] = True
    b[5:8, 12:15] = True  # shifted by 7 voxels along axis 1
    assert hausdorff95(a, b, (1.0, 1.0)) == pytest.approx(_brute_hd95(a, b, (1.0, 1.0)))
    assert hausdorff95(a, b, (1.0, 2.0)) == pytest.approx(_brute_hd95(a, b, (1.0, 2.0)))
    assert hausdorff95(a, b, (1.0, 2.0)) > hausdorff95(a, b, (1.0, 1.0))


def test_hd95_empty_cases() -> None:
    z = np.zeros((5, 5, 5), bool)
    one = z.copy()
    one[2, 2, 2] = True
    assert hausdorff95(z, z) == 0.0
    assert hausdorff95(one, z) == math.inf and hausdorff95(z, one) == math.inf
    assert hausdorff95(one, z, one_empty=373.13) == 373.13
    assert hausdorff95(one, one) == 0.0


def test_case_metrics_per_channel(rng: np.random.Generator) -> None:
    pred = rng.random((3, 6, 7, 8)) < 0.4
    gt = rng.random((3, 6, 7, 8)) < 0.4
    spacing = (2.0, 1.0, 0.5)
    out = case_metrics(pred, gt, spacing, names=["WT", "TC", "ET"])
    for k, name in enumerate(["WT", "TC", "ET"]):
        for metric, value in _numpy_ratios(pred[k], gt[k]).items():
            assert out[f"{metric}/{name}"] == pytest.approx(value)
        assert out[f"hd95/{name}"] == pytest.approx(_brute_hd95(pred[k], gt[k], spacing))
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(pred, gt, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="same shape"):
        case_metrics(pred, gt[:2])


def test_accumulator_single_process_sums_batches(rng: np.random.Generator) -> None:
    acc = MetricAccumulator(["a", "b"])
    logits = torch.from_numpy(rng.normal(size=(6, 2, 10, 10)).astype(np.float32))
    targets = torch.from_numpy(rng.random((6, 2, 10, 10)) < 0.3).float()
    for i in range(0, 6, 2):
        acc.update(confusion_counts(logits[i:i + 2], targets[i:i + 2]))
    whole = confusion_counts(logits, targets)
    assert torch.equal(acc.counts(), whole)
    assert acc.compute()["dice/b"] == pytest.approx(dice_from_counts(whole)[1].item())
    assert acc.compute()["dice/mean"] == pytest.approx(dice_from_counts(whole).mean().item())
    acc.reset()
    assert torch.equal(acc.counts(), torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        acc.update(torch.zeros(3, 4))
