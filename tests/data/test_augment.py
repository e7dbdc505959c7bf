"""Augmentation: alignment of image and label under the batched affine, flips, intensity-only transforms,
margin cropping and determinism. The same code is exercised in 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distseg.data.augment import DeviceAugment, apply_flips
from distseg.data.config import AugmentConfig

NO_INTENSITY = {"intensity_scale": (1.0, 1.0), "intensity_shift": 0.0, "gamma_prob": 0.0, "noise_prob": 0.0}
NO_SPATIAL = {"rotate_prob": 0.0, "scale_prob": 0.0}


def _smooth_volume(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """(1, 1, *shape) smooth random field: blurred noise, so thresholds give blob-shaped 'labels'."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, *shape, generator=g)
    pool = F.avg_pool3d if len(shape) == 3 else F.avg_pool2d
    for _ in range(3):
        x = pool(x, 5, stride=1, padding=2)
    return (x - x.mean()) / x.std()


@pytest.mark.parametrize("patch", [(24, 24, 24), (40, 40)])
def test_rotation_scaling_keeps_image_and_label_aligned(patch: tuple[int, ...]) -> None:
    margin = 6
    size = tuple(p + 2 * margin for p in patch)
    image = _smooth_volume(size).repeat(2, 1, *([1] * len(patch)))  # (B=2, 1, *size)
    label = (image[:, 0] > 0.3).to(torch.uint8)  # the label IS the thresholded image
    cfg = AugmentConfig(rotate_deg=40.0, rotate_prob=1.0, scale_prob=1.0, scale_range=(0.8, 1.25), **NO_INTENSITY)
    aug = DeviceAugment(cfg, patch, margin, seed=3)
    out_img, out_lab = aug(image, label, torch.tensor([5, 6]))
    assert out_img.shape == (2, 1, *patch) and out_lab.shape == (2, *patch) and out_lab.dtype == torch.uint8
    # the transform really moved things (not a plain crop) ...
    crop = (slice(None), *(slice(margin, margin + p) for p in patch))
    assert (out_lab != label[crop]).float().mean() > 0.05
    # ... and the resampled label agrees with the thresholded resampled image (off only at blob boundaries)
    agree = ((out_img[:, 0] > 0.3) == (out_lab > 0)).float().mean()
    assert agree > 0.95, f"image/label agreement {agree:.3f}"
    # a mismatched label (different sample's transform) would not agree: the check discriminates
    other = aug(image, label, torch.tensor([7, 8]))[1]
    assert ((out_img[:, 0] > 0.3) == (other > 0)).float().mean() < agree - 0.05


@pytest.mark.parametrize("patch", [(10, 12, 14), (12, 14)])
def test_identity_affine_equals_crop(patch: tuple[int, ...]) -> None:
    """Forcing the resampling path with a zero rotation and unit zoom must reproduce the exact centre crop."""
    margin = 3
    size = tuple(p + 2 * margin for p in patch)
    image = torch.randn(2, 2, *size)
    label = torch.randint(0, 4, (2, *size), dtype=torch.uint8)
    cfg = AugmentConfig(rotate_deg=0.0, rotate_prob=1.0, scale_range=(1.0, 1.0), **NO_INTENSITY)
    out_img, out_lab = DeviceAugment(cfg, patch, margin, seed=0)(image, label, [0, 1])
    crop = (slice(None), slice(None), *(slice(margin, margin + p) for p in patch))
    torch.testing.assert_close(out_img, image[crop], atol=1e-5, rtol=1e-5)
    assert torch.equal(out_lab, label[crop[:1] + crop[2:]])


def test_known_rotation_direction_2d() -> None:
    """A 90 degree in-plane rotation of a single bright pixel lands where the rotation matrix says."""
    patch, margin = (9, 9), 0
    image = torch.zeros(1, 1, *patch)
    image[0, 0, 4, 7] = 1.0  # offset (0, +3) from the centre (4, 4)
    cfg = AugmentConfig(rotate_deg=90.0, rotate_prob=1.0, scale_prob=0.0, **NO_INTENSITY)
    aug = DeviceAugment(cfg, patch, margin, seed=0)
    # find a sample index whose drawn angle is close to +-90 degrees, then check the pixel moved to (4 -+ 3, 4)
    for i in range(200):
        m = aug.draw(i, 1)["matrix"]
        if m is not None and abs(abs(m[1, 0]) - 1) < 1e-3:
            break
    else:
        pytest.fail("no sample drew a +-90 degree rotation")
    out, _ = aug(image, None, [i])
    peak = divmod(int(out[0, 0].argmax()), patch[1])
    # output voxel o samples input A o: the bright input offset (0, 3) appears at o = A^-1 (0, 3)
    expected = np.rint(np.linalg.inv(m) @ np.array([0.0, 3.0])).astype(int) + 4
    assert peak == tuple(expected)


def test_flips_are_involutions_and_keep_alignment() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 5, 6, 7)).astype(np.float32)
    label = (image[0] > 0).astype(np.uint8)
    for axes in [(0,), (1, 2), (0, 1, 2)]:
        fi, fl = apply_flips(image, label, axes)
        assert not np.array_equal(fi, image)
        assert np.array_equal((fi[0] > 0).astype(np.uint8), fl)
        bi, bl = apply_flips(fi, fl, axes)
        assert np.array_equal(bi, image) and np.array_equal(bl, label)


def test_intensity_transforms_leave_label_untouched() -> None:
    margin, patch = 2, (8, 8, 8)
    image = torch.randn(4, 3, 12, 12, 12)
    label = torch.randint(0, 4, (4, 12, 12, 12), dtype=torch.uint8)
    cfg = AugmentConfig(gamma_prob=1.0, noise_prob=1.0, **NO_SPATIAL)
    out_img, out_lab = DeviceAugment(cfg, patch, margin, seed=1)(image, label, torch.arange(4))
    crop = (slice(None), *(slice(margin, margin + p) for p in patch))
    assert torch.equal(out_lab, label[crop])
    assert not torch.allclose(out_img, image[(slice(None), slice(None), *crop[1:])])


def test_disabled_only_crops_and_determinism() -> None:
    margin, patch = 2, (6, 6)
    image = torch.randn(3, 1, 10, 10)
    label = torch.randint(0, 2, (3, 10, 10), dtype=torch.uint8)
    off = DeviceAugment(AugmentConfig(enabled=False), patch, margin, seed=0)
    out_img, out_lab = off(image, label, [0, 1, 2])
    assert torch.equal(out_img, image[:, :, 2:8, 2:8]) and torch.equal(out_lab, label[:, 2:8, 2:8])

    cfg = AugmentConfig(rotate_prob=0.5, scale_prob=0.5, gamma_prob=0.5, noise_prob=0.5)
    a = DeviceAugment(cfg, patch, margin, seed=7)
    same = DeviceAugment(cfg, patch, margin, seed=7)
    other_seed = DeviceAugment(cfg, patch, margin, seed=8)
    r1, r2, r3 = a(image, label, [10, 11, 12]), same(image, label, [10, 11, 12]), other_seed(image, label, [10, 11, 12])
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])
    assert not torch.equal(r1[0], r3[0])
    # a sample's augmentation depends on its own index only, not on its batch neighbours
    solo = a(image[1:2], label[1:2], [11])
    torch.testing.assert_close(solo[0][0], r1[0][1])
