"""Overlay PNGs a person looks at (distseg.core.overlay.overlay_figure, distseg.inference.outputs): >= 480 px
panels, masks upscaled by nearest neighbour, prediction beside the ground truth when there is one, a legend."""

from __future__ import annotations

import numpy as np
import pytest

from distseg.core.overlay import MIN_PANEL_PX, PALETTE, STRIP_RGB, overlay_figure, upscale_factor
from distseg.data.store import CaseArrays
from distseg.inference.outputs import overlay_2d, overlay_3d

NAMES = ["WT", "TC", "ET"]


def _masks(h: int = 40, w: int = 52) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grey (H, W), pred (3, H, W), gt (3, H, W)): nested regions, prediction shifted 6 pixels right of the truth."""
    yy, xx = np.mgrid[:h, :w]
    grey = (0.2 + 0.6 * (xx / w)).astype(np.float32)
    gt = np.stack([(yy - 20) ** 2 + (xx - 20) ** 2 <= r * r for r in (12, 7, 3)])
    pred = np.roll(gt, 6, axis=2)
    return grey, pred, gt


def _has(rgb: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.all(rgb == np.asarray(colour, dtype=np.uint8), axis=-1)


def _panels(img: np.ndarray, n: int, height: int, width: int) -> list[np.ndarray]:
    """Cut the n panels (each height x width) out of an overlay figure: side by side, 4 px apart, between the title
    strip and the legend strip. Column 1 holds no text, so its first row that is not strip colour is the top."""
    top = int(np.flatnonzero(~_has(img[:, 1:2], STRIP_RGB)[:, 0])[0])
    return [img[top : top + height, i * (width + 4) : i * (width + 4) + width] for i in range(n)]


def test_panels_are_upscaled_to_480_px_and_the_ground_truth_panel_appears_only_with_ground_truth():
    grey, pred, gt = _masks()
    k = upscale_factor(40, 52)
    assert k == 12 and 40 * k >= MIN_PANEL_PX
    with_gt = overlay_figure(grey, pred, gt, NAMES, "case_1: axial slice 3 of 9")
    without = overlay_figure(grey, pred, None, NAMES, "case_1: axial slice 3 of 9")
    assert with_gt.dtype == np.uint8 and with_gt.shape[2] == 3
    assert with_gt.shape[0] == without.shape[0] > 40 * k  # panels + title and legend strips
    assert with_gt.shape[1] == 3 * 52 * k + 2 * 4 and without.shape[1] == 2 * 52 * k + 4
    image, shown_pred, shown_gt = _panels(with_gt, 3, 40 * k, 52 * k)
    # Nearest-neighbour masks: every source pixel of a region is a k x k block; outlines are the exact colour.
    for panel, masks in ((shown_pred, pred), (shown_gt, gt)):
        painted = np.any(panel != image, axis=-1)
        np.testing.assert_array_equal(painted, masks[0].repeat(k, 0).repeat(k, 1))
        for r in range(3):
            assert _has(panel, PALETTE[r]).any(), f"region {NAMES[r]} outline missing"
    # The two panels show different masks: the truth is not a copy of the prediction.
    assert not np.array_equal(shown_pred, shown_gt)
    assert not np.any(image != _panels(without, 2, 40 * k, 52 * k)[0])


def test_the_legend_shows_one_swatch_per_region_in_its_colour_and_names_them():
    grey, pred, gt = _masks()
    img = overlay_figure(grey, pred, gt, NAMES)
    k = upscale_factor(40, 52)
    legend = img[-40:]  # the strip under the panels
    assert (img.shape[0] - 40 * k) >= 40
    for r in range(3):
        assert _has(legend, PALETTE[r]).sum() >= 100, f"no swatch of {NAMES[r]}"
    assert not _has(legend, PALETTE[3]).any()  # only the regions shown
    text = (legend.min(axis=-1) > 150) & ~np.any([_has(legend, c) for c in PALETTE[:3]], axis=0)
    assert text.sum() > 50  # the region names are drawn (light text on the dark strip)
    one = overlay_figure(grey, pred[:1], gt[:1], ["tumour"])[-40:]
    assert _has(one, PALETTE[0]).sum() >= 100 and not _has(one, PALETTE[1]).any()


def test_bad_shapes_are_named():
    grey, pred, gt = _masks()
    with pytest.raises(ValueError, match="K = 2 names"):
        overlay_figure(grey, pred, gt, ["WT", "TC"])
    with pytest.raises(ValueError, match="ground truth"):
        overlay_figure(grey, pred, gt[:, :10], NAMES)


def _case_3d(labelled: bool) -> tuple[CaseArrays, np.ndarray]:
    rng = np.random.default_rng(0)
    z, h, w = 9, 30, 34
    label = np.zeros((z, h, w), np.uint8)
    label[6, 10:20, 10:22] = 2
    label[6, 13:17, 13:19] = 3  # canonical: 3 = enhancing, so WT/TC/ET all present on slice 6
    image = rng.normal(size=(4, z, h, w)).astype(np.float32)
    pred = np.zeros((3, z, h, w), bool)
    pred[:, 2, 5:25, 5:25] = True  # a larger predicted tumour on slice 2
    case = CaseArrays("BraTS2021_00042", image, label if labelled else None, {"normalization": {"applied": True}})
    return case, pred


def test_3d_overlay_shows_the_ground_truth_slice_beside_the_prediction_when_labelled():
    case, pred = _case_3d(labelled=True)
    img = overlay_3d(case, pred, ["t1", "t1ce", "t2", "flair"], "brats3d", NAMES)
    k = upscale_factor(30, 34)
    assert img.shape[1] == 3 * 34 * k + 2 * 4 and min(30 * k, 34 * k) >= MIN_PANEL_PX
    unlabelled, _ = _case_3d(labelled=False)
    img2 = overlay_3d(unlabelled, pred, ["t1", "t1ce", "t2", "flair"], "brats3d", NAMES)
    assert img2.shape[1] == 2 * 34 * k + 4  # no ground truth: image | prediction
    # Labelled: the slice with the most ground truth (6) is shown, so its ET block appears in the truth panel.
    _, _, shown_gt = _panels(img, 3, 30 * k, 34 * k)
    assert _has(shown_gt, PALETTE[2]).any()


def test_2d_overlay_is_at_the_source_size_times_the_upscale_factor():
    h0, w0 = 64, 80  # the source image; stored resized to 32 x 40
    image = np.random.default_rng(1).integers(0, 255, size=(1, 1, 32, 40)).astype(np.float32)
    label = np.zeros((1, 32, 40), np.uint8)
    label[0, 8:20, 10:30] = 1
    attrs = {"normalization": {"applied": True}, "shape": [1, 1, 32, 40], "resized_from": [h0, w0],
             "original_shape_zyx": [1, h0, w0], "crop_box_zyx": [[0, 1], [0, h0], [0, w0]],
             "store_to_source_axes": [0, 1, 2], "source_ndim": 2}
    pred = label.astype(bool)[None]  # (1, 1, 32, 40)
    img = overlay_2d(CaseArrays("slice_7", image, label, attrs), pred, ["tumour"])
    k = upscale_factor(h0, w0)
    assert k == 8 and img.shape[1] == 3 * w0 * k + 2 * 4
    assert overlay_2d(CaseArrays("slice_7", image, None, attrs), pred, ["tumour"]).shape[1] == 2 * w0 * k + 4
