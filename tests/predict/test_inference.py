"""Sliding-window inference, regions -> labels and postprocessing on arrays (distseg.inference.window)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distseg.data.labels import BRATS_REGIONS
from distseg.data.targets import labels_to_targets, region_paint_values, regions_to_labels
from distseg.inference.postprocess import Postprocessing, RegionRule, apply_rule, postprocess
from distseg.inference.window import (
    SlidingWindow,
    _importance_cpu,
    forward_calls,
    importance_map,
    sliding_window,
    window_grid,
    window_starts,
)


@pytest.mark.parametrize("size,window,overlap", [(64, 64, 0.5), (65, 64, 0.5), (140, 96, 0.5), (300, 128, 0.25),
                                                 (10, 32, 0.5), (97, 32, 0.0), (155, 1, 0.5)])
def test_window_starts_cover_every_voxel_within_bounds(size, window, overlap):
    starts = window_starts(max(size, window), window, overlap)
    covered = np.zeros(max(size, window), dtype=int)
    for s in starts:
        assert 0 <= s <= max(size, window) - window
        covered[s : s + window] += 1
    assert covered.min() >= 1
    assert starts == sorted(set(starts))
    if len(starts) > 1:  # consecutive windows overlap by at least the asked fraction
        assert max(np.diff(starts)) <= window * (1 - overlap) + 1


def test_gaussian_importance_is_centred_positive_and_cached():
    sw = SlidingWindow(window=(9, 16, 1))
    g = importance_map(sw)
    assert g.shape == (9, 16, 1) and float(g.min()) > 0 and float(g.max()) == pytest.approx(1.0)
    assert torch.equal(g, torch.flip(g, [0])) and torch.equal(g, torch.flip(g, [1]))
    assert float(g[4, 7, 0]) > float(g[0, 0, 0])
    # Cached: the same window returns the very tensor computed the first time (a hit, no new computation) ...
    before = _importance_cpu.cache_info()
    assert importance_map(sw).data_ptr() == g.data_ptr()
    after = _importance_cpu.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)
    # ... and another window shape is computed anew.
    other = importance_map(SlidingWindow(window=(7, 13, 5)))
    assert other.shape == (7, 13, 5) and _importance_cpu.cache_info().misses == before.misses + 1


def _channels_model(k: int = 2):
    """A 'model' that returns the first k input channels as logits: sliding windows must reassemble the input."""
    def predict(x: torch.Tensor) -> torch.Tensor:
        return x[:, :k] * 1.0
    return predict


@pytest.mark.parametrize("importance", ["gaussian", "constant"])
@pytest.mark.parametrize("shape,window", [((3, 37, 50, 41), (16, 24, 16)), ((3, 10, 12, 9), (16, 16, 16)),
                                          ((3, 1, 70, 33), (1, 32, 32))])
def test_sliding_window_reassembles_the_input(shape, window, importance):
    image = torch.randn(shape)
    sw = SlidingWindow(window=window, overlap=0.5, window_batch=3, importance=importance)
    out = sliding_window(_channels_model(2), image, sw)
    assert out.shape == (2, *shape[1:]) and out.dtype == torch.float32
    torch.testing.assert_close(out, image[:2], atol=1e-5, rtol=1e-5)


def test_forward_calls_counts_the_model_calls():
    calls = []

    def predict(x):
        calls.append(x.shape[0])
        return x[:, :1]

    sw = SlidingWindow(window=(8, 8, 8), overlap=0.5, window_batch=3, mirror_axes=(0, 2))
    sliding_window(predict, torch.randn(2, 21, 13, 30), sw)
    assert len(calls) == forward_calls((21, 13, 30), sw)
    assert sum(calls) == len(window_grid((21, 13, 30), sw)) * 4  # 4 flip subsets of 2 axes


def test_mirror_tta_averages_every_flip_combination():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 1, 3, padding=1).eval()  # not flip-equivariant: TTA changes the result
    image = torch.randn(2, 16, 16, 16)
    sw = SlidingWindow(window=(16, 16, 16), mirror_axes=(0, 1, 2))
    got = sliding_window(conv, image, sw)
    with torch.no_grad():
        manual = torch.zeros(1, 16, 16, 16)
        for flips in sw.mirror_sets:
            dims = [a + 1 for a in flips]
            manual += torch.flip(conv(torch.flip(image, dims)[None])[0], dims) if dims else conv(image[None])[0]
    torch.testing.assert_close(got, manual / 8, atol=1e-5, rtol=1e-5)
    plain = sliding_window(conv, image, SlidingWindow(window=(16, 16, 16)))
    assert not torch.allclose(plain, got)


def test_matches_monai_where_window_placement_coincides():
    """Same model, window, overlap and constant weighting: identical logits to MONAI's sliding_window_inference when
    both place windows alike (S - W a multiple of the step; elsewhere MONAI's integer step and nnU-Net's even spacing
    differ slightly). The Gaussian maps differ only in discretisation (MONAI integrates the Gaussian over each voxel
    with erf, nnU-Net samples it at voxel centres): same shape within 0.06 after both are scaled to max 1."""
    monai_inferers = pytest.importorskip("monai.inferers")
    from monai.data.utils import compute_importance_map

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1)).eval()
    image = torch.randn(3, 32, 48, 40)  # window 16, step 8: every axis is 16 + k*8
    sw = SlidingWindow(window=(16, 16, 16), overlap=0.5, window_batch=4, importance="constant")
    ours = sliding_window(net, image, sw)
    with torch.inference_mode():
        ref = monai_inferers.sliding_window_inference(image[None], (16, 16, 16), 4, net, overlap=0.5,
                                                      mode="constant")[0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    theirs = compute_importance_map((16, 16, 16), mode="gaussian", sigma_scale=0.125)
    mine = importance_map(SlidingWindow(window=(16, 16, 16)))
    assert float((mine - theirs / theirs.max()).abs().max()) < 0.06


def test_region_paint_values_and_round_trip_through_targets():
    assert region_paint_values(BRATS_REGIONS) == [2, 1, 3]
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, size=(6, 7, 8)).astype(np.uint8)
    targets = labels_to_targets(torch.from_numpy(label)[None], "regions", BRATS_REGIONS)[0] > 0.5
    np.testing.assert_array_equal(regions_to_labels(targets, BRATS_REGIONS), label)
    with pytest.raises(ValueError, match="exactly one label"):
        region_paint_values({"a": [1, 2], "b": [3]})


def test_postprocessing_rules_and_nesting():
    wt = np.zeros((20, 20, 20), dtype=bool)
    wt[2:10, 2:10, 2:10] = True  # 512 voxels
    wt[15:17, 15:17, 15:17] = True  # 8-voxel island
    tc = wt.copy()
    et = np.zeros_like(wt)
    et[15, 15, 15] = True  # enhancing only inside the island
    masks = np.stack([wt, tc, et])
    kept = apply_rule(wt, RegionRule(keep_largest=True))
    assert kept.sum() == 512
    # min volume in mm^3: 8 voxels of 2 mm^3 = 16 mm^3 survive a 10 mm^3 threshold, not a 20 mm^3 one
    assert apply_rule(wt, RegionRule(min_volume=10), spacing=(2.0, 1.0, 1.0)).sum() == 520
    assert apply_rule(wt, RegionRule(min_volume=20), spacing=(2.0, 1.0, 1.0)).sum() == 512
    out = postprocess(masks, BRATS_REGIONS, Postprocessing({"WT": RegionRule(keep_largest=True)}))
    assert out[0].sum() == 512 and out[1].sum() == 512 and out[2].sum() == 0  # TC and ET clipped to the new WT
    assert Postprocessing.from_dict(Postprocessing({"ET": RegionRule(min_volume=5)}).to_dict()).rules["ET"] == \
        RegionRule(min_volume=5)


def test_a_nested_region_is_cleaned_inside_its_cleaned_container():
    """TC's keep-largest must choose among the pieces inside the whole tumour that WT's rule kept: the core in a
    discarded WT island is larger, and choosing it first would leave no core at all once clipped."""
    wt = np.zeros((20, 20, 20), dtype=bool)
    wt[2:10, 2:10, 2:10] = True  # the tumour: 512 voxels
    wt[14:17, 14:17, 14:17] = True  # a 27-voxel island
    tc = np.zeros_like(wt)
    tc[4:6, 4:6, 4:6] = True  # 8 voxels of core in the tumour
    tc[14:17, 14:17, 14:17] = True  # the island, all "core"
    masks = np.stack([wt, tc, np.zeros_like(wt)])
    pp = Postprocessing({"WT": RegionRule(keep_largest=True), "TC": RegionRule(keep_largest=True)})
    out = postprocess(masks, BRATS_REGIONS, pp)
    assert out[0].sum() == 512 and out[1].sum() == 8 and out[1][4:6, 4:6, 4:6].all()


@pytest.mark.parametrize("spatial_dims,shape", [(3, (2, 21, 30, 17)), (2, (2, 5, 33, 40))])
def test_downsampled_prediction_returns_the_original_grid(spatial_dims, shape):
    """`data.downsample`: pool by f, tile at that resolution, interpolate logits back to the case's own grid."""
    from distseg.data.resample import downsample_image
    from distseg.inference.window import case_logits

    image = torch.zeros(shape)
    image[:, :, 8:20, 4:14] = 1.0  # a block: pooled and interpolated back, its interior stays 1
    window = (8, 8, 8) if spatial_dims == 3 else (1, 8, 8)
    out = case_logits(_channels_model(1), image, SlidingWindow(window=window), downsample=2,
                      spatial_dims=spatial_dims)
    assert out.shape == (1, *shape[1:])
    pooled = downsample_image(image, 2, spatial_dims)
    expected_z = -(-shape[1] // 2) if spatial_dims == 3 else shape[1]
    assert pooled.shape[1:] == (expected_z, -(-shape[2] // 2), -(-shape[3] // 2))
    inner = out[0, 1:4, 11:18, 6:12] if spatial_dims == 3 else out[0, :, 11:18, 6:12]
    torch.testing.assert_close(inner, torch.ones_like(inner))
    assert float(out[0, :, :5, :].abs().max()) < 1e-6  # far from the block: 0
    same = case_logits(_channels_model(1), image, SlidingWindow(window=window), downsample=1)
    torch.testing.assert_close(same, image[:1])
