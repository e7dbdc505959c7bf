"""BraTS 2023 lesion-wise Dice/HD95 on hand-built masks whose answer is worked out by hand in each test.

Cubes are 4x4x4 = 64 voxels (56 of them on the surface); spacing 1 mm unless stated; penalty 374.
"""

from __future__ import annotations

import numpy as np
import pytest

from distseg.evaluation.lesionwise import LESION_HD95_PENALTY, gt_lesions, lesion_wise
from distseg.metrics import hausdorff95

SHAPE = (40, 40, 40)


def _cubes(*corners: tuple[int, int, int], size: int = 4, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for z, y, x in corners:
        mask[z:z + size, y:y + size, x:x + size] = True
    return mask


def test_penalty_is_the_official_374() -> None:
    assert LESION_HD95_PENALTY == 374.0


def test_two_separated_lesions_one_missed() -> None:
    gt = _cubes((5, 5, 5), (25, 25, 25))
    pred = _cubes((5, 5, 5))  # finds the first lesion exactly
    r = lesion_wise(pred, gt, (1.0, 1.0, 1.0))
    # lesion 1: Dice 1, HD95 0; lesion 2: missed -> Dice 0, HD95 374; no FP; 2 lesions.
    assert (r.tp, r.fn, r.fp) == (1, 1, 0)
    assert r.dice == pytest.approx(0.5) and r.hd95 == pytest.approx(187.0)
    assert [(s.volume, s.dice, s.hd95, s.n_matched) for s in r.lesions] == [(64.0, 1.0, 0.0, 1), (64.0, 0.0, 374.0, 0)]


def test_false_positive_component_and_a_near_component_that_is_not_one() -> None:
    gt = _cubes((5, 5, 5))
    pred = _cubes((5, 5, 5), (30, 30, 30), size=2)  # the lesion + a far 2x2x2 island (FP)
    pred |= _cubes((5, 5, 5))
    pred[6, 6, 11] = True  # 2 voxels off the lesion (x = 9, 10 empty): inside its 3-voxel catchment -> matched
    r = lesion_wise(pred, gt)
    # Lesion: pred = cube + 1 voxel -> Dice 2*64 / (64 + 65) = 128/129. HD95: 56 + 57 pooled surface distances, one
    # of them 3 (the stray voxel), the rest 0 -> the 95th percentile is 0. FP island: Dice 0, HD95 374.
    assert (r.tp, r.fn, r.fp) == (1, 0, 1)
    assert r.lesions[0].n_matched == 2 and r.lesions[0].dice == pytest.approx(128 / 129) and r.lesions[0].hd95 == 0.0
    assert r.dice == pytest.approx((128 / 129 + 0.0) / 2) and r.hd95 == pytest.approx((0.0 + 374.0) / 2)
    # Only the island (the lesion not found): 1 lesion missed + 1 FP -> 0 / 374.
    only_island = _cubes((30, 30, 30), size=2)
    r = lesion_wise(only_island, gt)
    assert (r.tp, r.fn, r.fp) == (0, 1, 1) and r.dice == 0.0 and r.hd95 == pytest.approx(374.0)


def test_small_lesions_are_dropped_by_volume_in_mm3() -> None:
    gt = _cubes((5, 5, 5)) | _cubes((25, 25, 25), size=3)  # 64 voxels + 27 voxels (<= 50: dropped)
    pred = _cubes((5, 5, 5))
    r = lesion_wise(pred, gt)
    assert (r.tp, r.fn, r.fp, r.n_dropped) == (1, 0, 0, 1) and r.dice == 1.0 and r.hd95 == 0.0
    # A component on the dropped lesion is neither a true nor a false positive.
    r = lesion_wise(pred | _cubes((25, 25, 25), size=3), gt)
    assert (r.tp, r.fn, r.fp) == (1, 0, 0) and r.dice == 1.0
    # Volume is voxels x voxel volume: at 2 x 1 x 1 mm the 27-voxel lesion is 54 mm^3 > 50 and counts (missed).
    r = lesion_wise(pred, gt, (2.0, 1.0, 1.0))
    assert (r.tp, r.fn, r.n_dropped) == (1, 1, 0) and r.dice == pytest.approx(0.5)
    assert r.lesions[1].volume == pytest.approx(54.0)
    # Exactly 50 is dropped (<=), 51 kept.
    strip = np.zeros(SHAPE, bool)
    strip[10, 10:12, 0:25] = True  # 2 x 25 = 50 voxels
    assert lesion_wise(np.zeros(SHAPE, bool), strip).n_dropped == 1
    strip[10, 12, 0] = True  # 51
    assert lesion_wise(np.zeros(SHAPE, bool), strip).fn == 1


@pytest.mark.parametrize(("gap", "merged"), [(6, True), (7, False)])
def test_pieces_within_the_dilation_merge_into_one_lesion(gap: int, merged: bool) -> None:
    # Two cubes along x with `gap` empty voxels between them. Each grows by 3 voxels: the catchments touch when
    # gap <= 6 (8 + 3 = 11 meets 9 + gap - 3), so the two pieces are one lesion; at 7 they stay two.
    gt = _cubes((5, 5, 5), (5, 5, 9 + gap))
    assert gt_lesions(gt)[1] == (1 if merged else 2)
    pred = _cubes((5, 5, 5))  # the first piece only
    r = lesion_wise(pred, gt)
    if merged:
        # One lesion of 128 undilated voxels (not the dilated volume): Dice 2*64 / (64 + 128) = 2/3; its HD95 is
        # that of the whole masks.
        assert (r.tp, r.fn, r.fp) == (1, 0, 0) and r.lesions[0].volume == 128.0
        assert r.dice == pytest.approx(2 / 3) and r.hd95 == pytest.approx(hausdorff95(pred, gt))
    else:
        assert (r.tp, r.fn, r.fp) == (1, 1, 0) and r.dice == pytest.approx(0.5) and r.hd95 == pytest.approx(187.0)


def test_one_component_can_match_two_lesions() -> None:
    gt = _cubes((5, 5, 5), (5, 5, 22))  # 13 voxels apart: two lesions
    pred = gt.copy()
    pred[6, 6, 9:22] = True  # a 13-voxel bridge: one component over both
    r = lesion_wise(pred, gt)
    # Each lesion vs the whole component (64 + 64 + 13 = 141 voxels): Dice 2*64 / (64 + 141) = 128/205.
    assert (r.tp, r.fn, r.fp) == (2, 0, 0)
    assert r.dice == pytest.approx(128 / 205)
    assert all(s.n_matched == 1 for s in r.lesions)


def test_both_empty_and_one_empty() -> None:
    empty = np.zeros(SHAPE, bool)
    r = lesion_wise(empty, empty)
    assert (r.dice, r.hd95, r.tp, r.fn, r.fp) == (1.0, 0.0, 0, 0, 0)
    two_islands = _cubes((2, 2, 2), (30, 30, 30), size=2)
    r = lesion_wise(two_islands, empty)  # nothing to find, two FPs
    assert (r.dice, r.hd95, r.fp) == (0.0, 374.0, 2)
    r = lesion_wise(empty, _cubes((5, 5, 5)))  # one lesion, nothing predicted
    assert (r.dice, r.hd95, r.fn) == (0.0, 374.0, 1)
    r = lesion_wise(empty, _cubes((5, 5, 5), size=3))  # only a dropped lesion: nothing counted
    assert (r.dice, r.hd95, r.n_dropped) == (1.0, 0.0, 1)


def test_connectivity_26_in_3d_and_8_in_2d() -> None:
    diagonal = np.zeros(SHAPE, bool)
    diagonal[3, 3, 3] = diagonal[4, 4, 4] = True  # corner-touching voxels: one 26-connected component
    assert lesion_wise(diagonal, np.zeros(SHAPE, bool)).fp == 1
    flat = np.zeros((20, 20), bool)
    flat[3, 3] = flat[4, 4] = True  # corner-touching pixels: one 8-connected component
    flat[10, 10] = True
    assert lesion_wise(flat, np.zeros((20, 20), bool)).fp == 2


def test_spacing_scales_hd95_and_penalty_and_border_lesions() -> None:
    gt = _cubes((0, 0, 0), size=5)  # touches the array border (corner)
    pred = _cubes((0, 0, 0), size=5)
    pred[0:5, 0:5, 5] = True  # one extra slab along x
    for spacing in [(1.0, 1.0, 1.0), (1.0, 1.0, 2.5)]:
        r = lesion_wise(pred, gt, spacing)
        assert r.lesions[0].hd95 == pytest.approx(hausdorff95(pred, gt, spacing))
        assert r.lesions[0].dice == pytest.approx(2 * 125 / (125 + 150))
    r = lesion_wise(np.zeros(SHAPE, bool), gt, (1.0, 1.0, 2.5), penalty=100.0)
    assert r.hd95 == 100.0


def test_whole_hd95_is_reused_only_when_the_lesion_is_both_whole_masks() -> None:
    gt = _cubes((5, 5, 5))
    pred = gt.copy()
    pred[6, 6, 11] = True  # a second component, matched to the one lesion: the lesion is the whole of both masks
    assert lesion_wise(pred, gt, whole_hd95=-1.0).lesions[0].hd95 == -1.0  # the given value was used
    assert lesion_wise(pred, gt).lesions[0].hd95 == hausdorff95(pred, gt)
    with_fp = pred | _cubes((30, 30, 30), size=2)  # a false positive: pred is more than the lesion's components
    assert lesion_wise(with_fp, gt, whole_hd95=-1.0).lesions[0].hd95 == 0.0
    two = gt | _cubes((25, 25, 25))  # two lesions: neither is the whole ground truth
    assert all(s.hd95 != -1.0 for s in lesion_wise(two, two, whole_hd95=-1.0).lesions)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="one 2D or 3D shape"):
        lesion_wise(np.zeros((3, 3, 3), bool), np.zeros((3, 3, 4), bool))
    with pytest.raises(ValueError, match="spacing"):
        lesion_wise(np.zeros((3, 3, 3), bool), np.zeros((3, 3, 3), bool), (1.0, 1.0))
