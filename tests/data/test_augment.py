"""Augmentation: alignment of image and label under the batched affine, flips, intensity-only transforms,
margin cropping and determinism. The same code is exercised in 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

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


class HostTraffic(TorchDispatchMode):
    """Counts what would stall the host on an accelerator: scalar reads of device tensors (.item(), .tolist(),
    bool(): aten::_local_scalar_dense) and host-to-device copies, blocking or not. A blocking copy from pageable
    memory synchronises on CUDA; a non-blocking one from pinned memory does not. Run on the `meta` device, where
    every op is shape-only, so the count needs no GPU. `torch.tensor(data, device=...)` copies below the dispatcher,
    so `_Factories` counts those at the Python API (as blocking copies)."""

    def __init__(self) -> None:
        super().__init__()
        self.scalar_reads = self.blocking_copies = self.async_copies = 0
        self._factories = _Factories(self)

    def __enter__(self):
        self._factories.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._factories.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func is aten._local_scalar_dense.default and args[0].device.type != "cpu":
            self.scalar_reads += 1
        src = dst = None
        non_blocking = False
        if func is aten._to_copy.default:
            src, dst, non_blocking = args[0].device, kwargs.get("device"), kwargs.get("non_blocking", False)
        elif func is aten.copy_.default:
            src, dst = args[1].device, args[0].device
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        if src is not None and dst is not None and src.type == "cpu" and torch.device(dst).type != "cpu":
            if non_blocking:
                self.async_copies += 1
            else:
                self.blocking_copies += 1
        return func(*args, **kwargs)


class _Factories(TorchFunctionMode):
    def __init__(self, counts: HostTraffic) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and device is not None:
            data = args[0] if args else kwargs.get("data")
            on_host = not (isinstance(data, torch.Tensor) and data.device.type != "cpu")
            if on_host and torch.device(device).type != "cpu":
                self.counts.blocking_copies += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("patch", [(16, 16, 16), (24, 24)])
def test_the_training_data_path_never_stalls_the_host(patch: tuple[int, ...]) -> None:
    """Per micro-step on the device: batch copies (pinned, non-blocking), augmentation with every transform drawn
    (nnU-Net's set included: one non-blocking copy of all its parameters), region targets (a cached table) -> no
    scalar read, no blocking copy. (Gaussian noise needs a device generator, which `meta` lacks; it adds no host
    traffic on CUDA.)"""
    from distseg.data.labels import BRATS_REGIONS
    from distseg.data.targets import labels_to_targets

    margin, batch, dev = 4, 3, torch.device("meta")
    size = tuple(p + 2 * margin for p in patch)
    cfg = AugmentConfig(
        rotate_prob=0.7, scale_prob=0.5, gamma_prob=0.5, noise_prob=0.0, elastic_prob=0.5, intensity_prob=0.5,
        blur_prob=0.5, contrast_prob=0.5, lowres_prob=0.5, gamma_invert_prob=0.5, gamma_retain_stats=True,
        split_factor_ranges=True,
    )
    aug = DeviceAugment(cfg, patch, margin, seed=0)
    drawn = ("matrix", "gamma", "elastic", "blur", "contrast", "lowres", "gamma_invert")

    def micro_step(i: int) -> None:
        image = torch.randn(batch, 4, *size).to(dev, non_blocking=True)  # the loader's pinned batch
        label = torch.randint(0, 4, (batch, *size), dtype=torch.uint8).to(dev, non_blocking=True)
        image, label = aug(image, label, torch.arange(i * batch, (i + 1) * batch))
        targets = labels_to_targets(label, "regions", BRATS_REGIONS)
        assert image.shape == (batch, 4, *patch) and targets.shape == (batch, 3, *patch)

    micro_step(0)  # first use builds the cached region table
    traffic = HostTraffic()
    drew = dict.fromkeys(drawn, 0)
    with traffic:
        for i in range(1, 9):
            micro_step(i)
            params = [aug.draw(j, 4) for j in range(i * batch, (i + 1) * batch)]
            for key in drawn:
                drew[key] += any(p[key] is not None for p in params)
    assert all(drew.values()), drew  # every path that needs device parameters did run
    assert traffic.scalar_reads == 0 and traffic.blocking_copies == 0, vars(traffic)
    assert traffic.async_copies == 8 * 3  # image, label, and ONE packed parameter copy per micro-step
