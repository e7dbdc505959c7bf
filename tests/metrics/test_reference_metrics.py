"""distseg's metrics against independent implementations (MedPy, MONAI) and HD95 cropped vs uncropped.

MedPy and the BraTS tooling pool both surface-distance directions before the 95th percentile; MONAI takes the
larger of the two directed 95th percentiles: each is compared with its own definition. Empty masks are checked
against distseg's documented conventions (MedPy and MONAI use others: 0, NaN or an exception).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from distseg.evaluation import evaluate_case
from distseg.metrics import foreground_box, hausdorff95, surface, surface_distances

medpy_binary = pytest.importorskip("medpy.metric.binary", reason="medpy is a test-only dependency ([dev] extra)")
monai_metrics = pytest.importorskip("monai.metrics", reason="monai is a test-only dependency ([dev] extra)")

CASES = [  # (shape, spacing): 2D and 3D, isotropic and anisotropic
    ((40, 37), (1.0, 1.0)),
    ((33, 41), (0.6, 2.3)),
    ((18, 21, 16), (1.0, 1.0, 1.0)),
    ((16, 20, 14), (3.0, 0.9, 1.7)),
]


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], touch_border: bool) -> np.ndarray:
    """A few random ellipsoid-ish blobs plus scattered voxels (non-empty); optionally touching the array border."""
    grid = np.indices(shape, dtype=np.float64)
    mask = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(1, 4)):
        centre = [rng.uniform(0, n) for n in shape]
        radii = [rng.uniform(1.5, n / 3) for n in shape]
        mask |= sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0
    mask |= rng.random(shape) < 0.01
    if touch_border:
        mask[(0,) * len(shape)] = True
        mask[tuple(n - 1 for n in shape)] = True
    mask.flat[rng.integers(mask.size)] = True
    return mask


def _pairs(rng: np.random.Generator, shape: tuple[int, ...]):
    """Random pairs incl. border-touching masks, single voxels, and one mask inside the other."""
    for touch in (False, True, False, True):
        yield _blobs(rng, shape, touch), _blobs(rng, shape, not touch)
    one_a, one_b = np.zeros(shape, bool), np.zeros(shape, bool)
    one_a[tuple(n // 3 for n in shape)] = True
    one_b[tuple(n - 2 for n in shape)] = True
    yield one_a, one_b
    big = _blobs(rng, shape, False)
    yield big, ndimage.binary_erosion(big) | one_a


def _uncropped_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> float:
    """The pre-crop implementation: surfaces and EDTs over the whole array."""
    sa, sb = surface(a), surface(b)
    d_ab = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    return float(np.percentile(np.concatenate([d_ab, d_ba]), 95))


@pytest.mark.parametrize(("shape", "spacing"), CASES)
def test_hd95_cropped_equals_uncropped(rng: np.random.Generator, shape, spacing) -> None:
    for a, b in _pairs(rng, shape):
        assert hausdorff95(a, b, spacing) == _uncropped_hd95(a, b, spacing)


def test_foreground_box_grows_by_one_and_clips() -> None:
    m = np.zeros((10, 12), bool)
    m[3:5, 0:2] = True
    assert foreground_box(m) == (slice(2, 6), slice(0, 3))
    assert foreground_box(np.zeros((3, 3), bool)) is None


@pytest.mark.parametrize(("shape", "spacing"), CASES)
def test_ratios_and_hd95_match_medpy(rng: np.random.Generator, shape, spacing) -> None:
    for pred, gt in _pairs(rng, shape):
        (row,) = evaluate_case(pred[None], gt[None], spacing, ["r"])
        assert row["dice"] == pytest.approx(medpy_binary.dc(pred, gt), rel=1e-12)
        assert row["iou"] == pytest.approx(medpy_binary.jc(pred, gt), rel=1e-12)
        assert row["precision"] == pytest.approx(medpy_binary.precision(pred, gt), rel=1e-12)
        assert row["recall"] == pytest.approx(medpy_binary.recall(pred, gt), rel=1e-12)
        assert row["specificity"] == pytest.approx(medpy_binary.specificity(pred, gt), rel=1e-12)
        # MedPy's hd95: both directions pooled, 95th percentile; surface = face-connected erosion border.
        assert row["hd95"] == pytest.approx(medpy_binary.hd95(pred, gt, voxelspacing=spacing), rel=1e-12)
        assert row["accuracy"] == pytest.approx(float((pred == gt).mean()), rel=1e-12)


def _monai(pred: np.ndarray, gt: np.ndarray):
    return torch.from_numpy(pred[None, None].astype(np.float32)), torch.from_numpy(gt[None, None].astype(np.float32))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notice inside get_mask_edges
@pytest.mark.parametrize(("shape", "spacing"), CASES)
def test_dice_iou_hausdorff_match_monai(rng: np.random.Generator, shape, spacing) -> None:
    dice_metric = monai_metrics.DiceMetric(include_background=True, reduction="none")
    iou_metric = monai_metrics.MeanIoU(include_background=True, reduction="none")
    for pred, gt in _pairs(rng, shape):
        p, g = _monai(pred, gt)
        (row,) = evaluate_case(pred[None], gt[None], spacing, ["r"])
        assert row["dice"] == pytest.approx(float(dice_metric(p, g)), rel=1e-6)
        assert row["iou"] == pytest.approx(float(iou_metric(p, g)), rel=1e-6)
        # MONAI's definition: max over the two directed 95th percentiles (not pooled); compare with ours built
        # from the same directed distances, and the plain Hausdorff distance (max) with our max.
        d_pg, d_gp = surface_distances(pred, gt, spacing), surface_distances(gt, pred, spacing)
        monai_hd95 = monai_metrics.compute_hausdorff_distance(p, g, include_background=True, percentile=95,
                                                              spacing=list(spacing))
        expected = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
        assert float(monai_hd95) == pytest.approx(expected, rel=1e-5)
        monai_hd = monai_metrics.compute_hausdorff_distance(p, g, include_background=True, spacing=list(spacing))
        assert float(monai_hd) == pytest.approx(max(d_pg.max(), d_gp.max()), rel=1e-5)


def test_empty_and_one_voxel_conventions() -> None:
    z = np.zeros((1, 6, 7, 5), bool)
    one = z.copy()
    one[0, 2, 3, 1] = True
    (both_empty,) = evaluate_case(z, z, (1.0, 2.0, 3.0), ["ET"])
    assert both_empty["dice"] == 1.0 and both_empty["iou"] == 1.0 and both_empty["hd95"] == 0.0
    assert both_empty["recall"] == 1.0 and both_empty["specificity"] == 1.0 and both_empty["accuracy"] == 1.0
    (missed,) = evaluate_case(z, one, (1.0, 2.0, 3.0), ["ET"])
    assert missed["dice"] == 0.0 and missed["recall"] == 0.0 and missed["hd95"] == 373.13
    (spurious,) = evaluate_case(one, z, (1.0, 2.0, 3.0), ["ET"], one_empty_hd95=math.inf)
    assert spurious["dice"] == 0.0 and spurious["hd95"] == math.inf and spurious["precision"] == 0.0
    (same,) = evaluate_case(one, one, (1.0, 2.0, 3.0), ["ET"])
    assert same["dice"] == 1.0 and same["hd95"] == 0.0 and (same["tp"], same["fp"], same["fn"]) == (1, 0, 0)
    # MedPy's conventions differ for empty masks (Dice of two empty masks NaN, HD95 raises); ours are BraTS'.
    with np.errstate(invalid="ignore"):
        assert math.isnan(medpy_binary.dc(z[0], z[0]))
    with pytest.raises(RuntimeError):
        medpy_binary.hd95(z[0], one[0])
    # MONAI: an empty ground truth gives NaN Dice by default (ignore_empty); ours is 1 for both empty.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(float(monai_metrics.DiceMetric(include_background=True)(*_monai(z[0], z[0]))))


def test_one_voxel_apart_distances_scale_with_spacing() -> None:
    a = np.zeros((1, 9, 9, 9), bool)
    b = a.copy()
    a[0, 4, 4, 2] = True
    b[0, 4, 4, 6] = True  # 4 voxels apart along the last axis
    (row,) = evaluate_case(a, b, (1.0, 1.0, 2.5), ["x"])
    assert row["hd95"] == pytest.approx(10.0)
    assert row["hd95"] == pytest.approx(medpy_binary.hd95(a[0], b[0], voxelspacing=(1.0, 1.0, 2.5)))
