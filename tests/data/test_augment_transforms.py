"""nnU-Net's augmentation set in `DeviceAugment`: each transform does what it names (checked against an independent
computation), in 2D (B, C, H, W) and 3D (B, C, D, H, W); label values stay in the original set; draws are a pure
function of (seed, sample index); application probabilities hold over many samples; configs that leave the new
transforms off draw exactly what the first version drew."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from distseg.config import load_config
from distseg.data.augment import DeviceAugment, rotation_matrix, split_factors
from distseg.data.config import AugmentConfig

# Everything off: each test switches on what it checks.
OFF = {
    "rotate_prob": 0.0, "scale_prob": 0.0, "intensity_scale": (1.0, 1.0), "intensity_shift": 0.0,
    "gamma_prob": 0.0, "noise_prob": 0.0,
}
PATCHES = [(9, 10, 11), (12, 13)]
REPO = Path(__file__).resolve().parents[2]


def _cfg(**kw) -> AugmentConfig:
    cfg = AugmentConfig(**{**OFF, **kw})
    cfg.validate()
    return cfg


class Forced(DeviceAugment):
    """DeviceAugment whose drawn parameters are overridden by `forced` (tests the application path exactly)."""

    def __init__(self, cfg: AugmentConfig, patch, margin: int, forced: dict) -> None:
        super().__init__(cfg, patch, margin, seed=0)
        self.forced = forced

    def draw(self, index: int, channels: int) -> dict:
        return {**super().draw(index, channels), **self.forced}


def _crop(x: torch.Tensor, margin: int, nd: int) -> torch.Tensor:
    return x[(..., *[slice(margin, x.shape[-nd + i] - margin) for i in range(nd)])] if margin else x


# ---- spatial ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("margin", [0, 3])
@pytest.mark.parametrize(
    ("nd", "angles", "dims"),
    [(2, [math.pi / 2], (-2, -1)), (3, [math.pi / 2, 0.0, 0.0], (-2, -1)), (3, [0.0, 0.0, math.pi / 2], (-3, -2))],
)
def test_rotation_by_90_degrees_equals_rot90(nd: int, angles: list[float], dims: tuple[int, int], margin: int) -> None:
    """On a square (cubic) patch a 90 degree rotation about the centre is a pure voxel permutation: rot90 of the
    crop. Output voxel o samples input A o, A = R(+90) in the (row, col) plane, i.e. rot90 with k = -1."""
    patch = (8,) * nd
    size = tuple(p + 2 * margin for p in patch)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, *size, generator=g)
    label = torch.randint(0, 4, (2, *size), generator=g).to(torch.uint8)
    aug = Forced(_cfg(rotate_prob=1.0), patch, margin, {"matrix": rotation_matrix(angles)})
    out_img, out_lab = aug(image, label, [0, 1])
    expected_img = torch.rot90(_crop(image, margin, nd), k=-1, dims=dims)
    torch.testing.assert_close(out_img, expected_img, atol=1e-4, rtol=1e-4)
    assert torch.equal(out_lab, torch.rot90(_crop(label, margin, nd), k=-1, dims=dims))


@pytest.mark.parametrize("nd", [2, 3])
def test_zoom_2x_maps_a_known_point(nd: int) -> None:
    """Zoom 2 (scale_range (2, 2)): an input point d voxels from the centre appears 2d from the centre."""
    patch = (17,) * nd
    centre = (8,) * nd
    image = torch.zeros(1, 1, *patch)
    src = list(centre)
    src[-1] += 3  # 3 voxels right of the centre
    image[(0, 0, *src)] = 1.0
    label = (image[:, 0] > 0).to(torch.uint8) * 4
    out_img, out_lab = DeviceAugment(_cfg(scale_prob=1.0, scale_range=(2.0, 2.0)), patch, 0, seed=0)(
        image, label, [0]
    )
    dst = list(centre)
    dst[-1] += 6
    peak = np.unravel_index(int(out_img[0, 0].argmax()), patch)
    assert tuple(int(v) for v in peak) == tuple(dst)
    assert out_img[(0, 0, *dst)] == pytest.approx(1.0, abs=1e-5)
    assert out_lab[(0, *dst)] == 4


@pytest.mark.parametrize("patch", PATCHES)
def test_spatial_transforms_keep_label_values_in_the_original_set(patch: tuple[int, ...]) -> None:
    margin = 4
    size = tuple(p + 2 * margin for p in patch)
    values = torch.tensor([0, 1, 2, 4], dtype=torch.uint8)  # BraTS 2018 labels: 3 must never appear
    g = torch.Generator().manual_seed(1)
    label = values[torch.randint(0, 4, (6, *size), generator=g)]
    image = torch.randn(6, 2, *size, generator=g)
    cfg = _cfg(rotate_prob=1.0, rotate_deg=45.0, scale_prob=1.0, elastic_prob=1.0, elastic_magnitude=(0.05, 0.1))
    _, out = DeviceAugment(cfg, patch, margin, seed=2)(image, label, torch.arange(6))
    assert out.dtype == torch.uint8 and out.shape == (6, *patch)
    assert set(out.unique().tolist()) <= {0, 1, 2, 4}


@pytest.mark.parametrize("patch", [(20, 20, 20), (40, 40)])
def test_elastic_deformation_moves_image_and_label_together_within_its_magnitude(patch: tuple[int, ...]) -> None:
    nd = len(patch)
    margin = 4
    size = tuple(p + 2 * margin for p in patch)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, *size, generator=g)
    pool = F.avg_pool3d if nd == 3 else F.avg_pool2d
    for _ in range(3):
        x = pool(x, 5, stride=1, padding=2)
    image = ((x - x.mean()) / x.std()).repeat(3, 1, *([1] * nd))
    label = (image[:, 0] > 0.3).to(torch.uint8)
    cfg = _cfg(elastic_prob=1.0, elastic_magnitude=(0.1, 0.1))
    aug = DeviceAugment(cfg, patch, margin, seed=4)
    out_img, out_lab = aug(image, label, [0, 1, 2])
    crop = (slice(None), *(slice(margin, margin + p) for p in patch))
    assert (out_lab != label[crop]).float().mean() > 0.02  # it deformed
    assert ((out_img[:, 0] > 0.3) == (out_lab > 0)).float().mean() > 0.95  # image and label alike
    lattice = aug.draw(0, 1)["elastic"]
    assert lattice.shape == (nd, *([cfg.elastic_points] * nd))
    for d in range(nd):  # each component peaks at exactly magnitude * patch along its axis
        assert np.abs(lattice[d]).max() == pytest.approx(0.1 * patch[d])
    zero = DeviceAugment(_cfg(elastic_prob=1.0, elastic_magnitude=(0.0, 0.0)), patch, margin, seed=4)
    torch.testing.assert_close(zero(image, label, [0, 1, 2])[0], image[(slice(None), slice(None), *crop[1:])])


# ---- intensity ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch", [(24, 24, 24), (96, 96)])
def test_noise_std_matches_the_drawn_sigma(patch: tuple[int, ...]) -> None:
    image = torch.zeros(3, 2, *patch)
    aug = DeviceAugment(_cfg(noise_prob=1.0, noise_std=0.5), patch, 0, seed=3)
    out, _ = aug(image, None, [0, 1, 2])
    for b in range(3):
        sigma = aug.draw(b, 2)["sigma"]
        assert out[b].std().item() == pytest.approx(sigma, rel=0.03)
        assert abs(out[b].mean().item()) < 0.03 * sigma + 1e-6


@pytest.mark.parametrize("patch", PATCHES)
def test_gamma_1_is_the_identity_plain_inverted_and_with_retained_stats(patch: tuple[int, ...]) -> None:
    image = torch.randn(2, 3, *patch)
    for retain in (False, True):
        cfg = _cfg(gamma_prob=1.0, gamma_invert_prob=1.0, gamma_range=(1.0, 1.0), gamma_retain_stats=retain)
        out, _ = DeviceAugment(cfg, patch, 0, seed=0)(image, None, [0, 1])
        torch.testing.assert_close(out, image, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("nd", [2, 3])
def test_gamma_inversion_and_retained_statistics(nd: int) -> None:
    """On intensities spanning [0, 1]: gamma g gives x^g, inverted gamma gives 1 - (1 - x)^g; with retained stats
    each channel keeps its mean and standard deviation."""
    shape = (1, 1) + (6,) * nd
    x = torch.linspace(0, 1, math.prod(shape)).reshape(shape)
    plain = Forced(_cfg(gamma_prob=1.0), shape[2:], 0, {"gamma": np.array([2.0])})
    torch.testing.assert_close(plain(x, None, [0])[0], x**2, atol=1e-6, rtol=1e-5)
    inverted = Forced(_cfg(), shape[2:], 0, {"gamma_invert": np.array([2.0])})
    torch.testing.assert_close(inverted(x, None, [0])[0], 1 - (1 - x) ** 2, atol=1e-6, rtol=1e-5)
    kept = Forced(_cfg(gamma_retain_stats=True), shape[2:], 0, {"gamma": np.array([2.0])})
    y = kept(x, None, [0])[0]
    assert not torch.allclose(y, x, atol=1e-3)
    assert y.mean().item() == pytest.approx(x.mean().item(), abs=1e-5)
    assert y.std().item() == pytest.approx(x.std().item(), rel=1e-4)


@pytest.mark.parametrize("nd", [2, 3])
def test_blur_of_a_point_has_the_drawn_sigma_per_axis(nd: int) -> None:
    size = 15
    image = torch.zeros(2, 2, *([size] * nd))
    image[(slice(None), slice(None), *([size // 2] * nd))] = 1.0
    cfg = _cfg(blur_prob=1.0, blur_channel_prob=1.0, blur_sigma=(0.5, 1.5))
    aug = DeviceAugment(cfg, (size,) * nd, 0, seed=5)
    out, _ = aug(image, None, [0, 1])
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    for b in range(2):
        sigmas = aug.draw(b, 2)["blur"]
        for ch in range(2):
            x = out[b, ch].double()
            assert x.sum().item() == pytest.approx(1.0, abs=1e-5)  # normalised kernel
            for axis in range(nd):
                marginal = x.sum(dim=tuple(a for a in range(nd) if a != axis))
                var = (marginal * coords**2).sum().item()
                # a Gaussian sampled at integer offsets, truncated at ceil(3 * 1.5) = 5 voxels (as scipy's
                # gaussian_filter samples it): its variance is sigma^2 to within 1 % for sigma >= 0.8, 0.215 at 0.5
                w = np.exp(-0.5 * (np.arange(-5, 6) / sigmas[ch, axis]) ** 2)
                expected = (w * np.arange(-5, 6) ** 2).sum() / w.sum()
                assert var == pytest.approx(expected, rel=1e-4), (b, ch, axis)
                assert var == pytest.approx(sigmas[ch, axis] ** 2, rel=0.15)


def test_blur_touches_only_the_drawn_channels() -> None:
    patch = (16, 16)
    image = torch.randn(8, 4, *patch)
    cfg = _cfg(blur_prob=1.0, blur_channel_prob=0.5)
    aug = DeviceAugment(cfg, patch, 0, seed=6)
    out, _ = aug(image, None, torch.arange(8))
    for b in range(8):
        sig = aug.draw(b, 4)["blur"]
        for ch in range(4):
            changed = not torch.equal(out[b, ch], image[b, ch])
            assert changed == (sig is not None and bool(sig[ch].any()))


@pytest.mark.parametrize("patch", PATCHES)
def test_contrast_scales_about_the_mean_and_keeps_the_range(patch: tuple[int, ...]) -> None:
    image = torch.randn(2, 3, *patch)
    out, _ = DeviceAugment(_cfg(contrast_prob=1.0, contrast_range=(2.0, 2.0)), patch, 0, seed=0)(image, None, [0, 1])
    flat = image.flatten(2)
    view = (2, 3) + (1,) * len(patch)
    mean, lo, hi = (v.view(view) for v in (flat.mean(2), flat.amin(2), flat.amax(2)))
    torch.testing.assert_close(out, torch.clamp((image - mean) * 2 + mean, lo, hi))
    one, _ = DeviceAugment(_cfg(contrast_prob=1.0, contrast_range=(1.0, 1.0)), patch, 0, seed=0)(image, None, [0, 1])
    torch.testing.assert_close(one, image)


def test_brightness_is_intensity_scale_with_its_probability() -> None:
    patch = (6, 6, 6)
    image = torch.randn(16, 2, *patch)
    cfg = _cfg(intensity_scale=(2.0, 2.0), intensity_prob=0.5)
    aug = DeviceAugment(cfg, patch, 0, seed=1)
    out, _ = aug(image, None, torch.arange(16))
    scaled = [torch.equal(out[b], image[b] * 2) for b in range(16)]
    kept = [torch.equal(out[b], image[b]) for b in range(16)]
    assert all(s or k for s, k in zip(scaled, kept, strict=True)) and any(scaled) and any(kept)
    assert [bool((aug.draw(b, 2)["mult"] == 2).all()) for b in range(16)] == scaled


@pytest.mark.parametrize("patch", [(16, 16, 16), (32, 32)])
def test_low_resolution_keeps_shape_and_loses_detail(patch: tuple[int, ...]) -> None:
    nd = len(patch)
    grids = torch.meshgrid(*[torch.arange(p) for p in patch], indexing="ij")
    checker = (sum(grids) % 2).float()  # finest detail: a one-voxel checkerboard
    smooth = sum(g.float() for g in grids) / sum(patch)  # a slow ramp survives
    image = torch.stack([checker, smooth]).unsqueeze(0).repeat(2, 1, *([1] * nd))
    cfg = _cfg(lowres_prob=1.0, lowres_channel_prob=1.0, lowres_zoom=(0.5, 0.5))
    out, _ = DeviceAugment(cfg, patch, 0, seed=0)(image, None, [0, 1])
    assert out.shape == image.shape
    assert (out[:, 0] - out[:, 0].mean()).abs().mean() < 0.5 * (checker - checker.mean()).abs().mean()
    assert (out[:, 1] - image[:, 1]).abs().max() < 2.5 / min(patch) * nd
    # the same through the loop: a channel keeps zoom 1 when not drawn
    cfg_half = _cfg(lowres_prob=1.0, lowres_channel_prob=0.5, lowres_zoom=(0.5, 0.5))
    aug = DeviceAugment(cfg_half, patch, 0, seed=3)
    out_half, _ = aug(image, None, [0, 1])
    for b in range(2):
        zooms = aug.draw(b, 2)["lowres"]
        for ch in range(2):
            kept = zooms is None or zooms[ch] >= 1.0
            assert kept == torch.equal(out_half[b, ch], image[b, ch])


# ---- determinism, probabilities, compatibility -------------------------------------------------------------------
def _every_transform(**kw) -> AugmentConfig:
    on = {
        "rotate_prob": 0.5, "scale_prob": 0.5, "elastic_prob": 0.5, "intensity_prob": 0.5, "blur_prob": 0.5,
        "contrast_prob": 0.5, "lowres_prob": 0.5, "gamma_invert_prob": 0.5, "gamma_prob": 0.5, "noise_prob": 0.5,
    }
    return dataclasses.replace(AugmentConfig.nnunet(3), **on, **kw)


@pytest.mark.parametrize("patch", PATCHES)
def test_same_seed_and_index_give_identical_output_whatever_the_batch(patch: tuple[int, ...]) -> None:
    margin = 3
    size = tuple(p + 2 * margin for p in patch)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(4, 3, *size, generator=g)
    label = torch.randint(0, 3, (4, *size), generator=g).to(torch.uint8)
    cfg = _every_transform()
    a, same = DeviceAugment(cfg, patch, margin, seed=9), DeviceAugment(cfg, patch, margin, seed=9)
    idx = [40, 41, 42, 43]
    r1, r2 = a(image, label, idx), same(image, label, idx)
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])
    assert not torch.equal(r1[0], DeviceAugment(cfg, patch, margin, seed=10)(image, label, idx)[0])
    for b in range(4):  # each sample depends on its own index only, not on its batch neighbours
        solo = a(image[b : b + 1], label[b : b + 1], [idx[b]])
        torch.testing.assert_close(solo[0][0], r1[0][b], atol=1e-5, rtol=1e-5)
        assert torch.equal(solo[1][0], r1[1][b])


def test_application_probabilities_hold_over_many_samples() -> None:
    probs = {
        "rotate_prob": 0.2, "scale_prob": 0.0, "elastic_prob": 0.3, "intensity_prob": 0.15, "blur_prob": 0.2,
        "contrast_prob": 0.15, "lowres_prob": 0.25, "gamma_invert_prob": 0.1, "gamma_prob": 0.3, "noise_prob": 0.1,
        "blur_channel_prob": 0.5, "lowres_channel_prob": 0.5,
    }
    cfg = _cfg(**probs, intensity_scale=(0.75, 1.25))
    aug = DeviceAugment(cfg, (8, 8, 8), 0, seed=0)
    n, c = 4000, 4
    draws = [aug.draw(i, c) for i in range(n)]

    def rate(hits: int, trials: int, p: float) -> None:
        assert abs(hits / trials - p) < 4 * math.sqrt(p * (1 - p) / trials) + 1e-9, (hits / trials, p)

    rate(sum(d["matrix"] is not None for d in draws), n, 1 - (1 - 0.2) * (1 - 0.3))  # rotation or elastic
    rate(sum(d["elastic"] is not None for d in draws), n, 0.3)
    rate(sum(not (d["mult"] == 1).all() for d in draws), n, 0.15)
    rate(sum(d["contrast"] is not None for d in draws), n, 0.15)
    rate(sum(d["gamma_invert"] is not None for d in draws), n, 0.1)
    rate(sum(d["gamma"] is not None for d in draws), n, 0.3)
    rate(sum(d["sigma"] is not None for d in draws), n, 0.1)
    # blur / low resolution: the sample with p, then each channel with p_channel (a sample with no channel drawn
    # is reported as not transformed)
    for key, p in (("blur", 0.2), ("lowres", 0.25)):
        rate(sum(d[key] is not None for d in draws), n, p * (1 - 0.5**c))
        per_channel = np.concatenate([(d[key] != (0.0 if key == "blur" else 1.0)).reshape(c, -1).all(1)
                                      for d in draws if d[key] is not None])
        rate(int(per_channel.sum()), len(per_channel), 0.5 / (1 - 0.5**c))


def test_split_factor_ranges_draw_below_and_above_1_equally() -> None:
    rng = np.random.default_rng(0)
    u, coin = rng.random(20000), rng.random(20000)
    f = split_factors(u, coin, 0.7, 1.5)
    assert f.min() >= 0.7 and f.max() <= 1.5 and abs((f < 1).mean() - 0.5) < 0.02
    assert (split_factors(u, coin, 1.2, 1.5) >= 1.2).all() and (split_factors(u, coin, 0.5, 0.9) <= 0.9).all()
    gam = [DeviceAugment(_cfg(gamma_prob=1.0, split_factor_ranges=s), (4, 4), 0, 0).draw(i, 1)["gamma"][0]
           for s in (True, False) for i in range(2000)]
    assert abs(np.mean(np.array(gam[:2000]) < 1) - 0.5) < 0.05  # nnU-Net: as often below 1 as above
    assert abs(np.mean(np.array(gam[2000:]) < 1) - 0.3 / 0.8) < 0.05  # uniform over (0.7, 1.5)


@pytest.mark.parametrize("nd", [2, 3])
def test_the_first_versions_draws_are_unchanged(nd: int) -> None:
    """Pinned values drawn by the code before nnU-Net's additions (commit e49ebe0) for the same (seed, index): a
    config that leaves the new fields off augments a resumed or repeated run exactly as before; switching new
    transforms on leaves the original draws where they were."""
    old = {
        3: ([[1.2157638529457258, 0.3904889916843454, 0.531121362688375],
             [-0.5695208062432755, 1.1833123467674982, 0.43367181359140144],
             [-0.33199037002091264, -0.5999529465057981, 1.2010379497969406]],
            [1.098168475838038, 1.0882758016339016], [-0.045008562980311445, 0.03788606744529162],
            [1.0939830943029436, 1.2250538047690034], 0.01099405276576726, 600370469547448170),
        2: ([[1.181515266010608, 0.5902008053155123], [-0.5902008053155123, 1.181515266010608]],
            [0.9796974801596592, 0.9065921562584784], [0.09816847583803781, 0.08827580163390147],
            [1.2515442697811663, 1.2027610368816029], 0.06563172559612541, 4216356991142818949),
    }[nd]
    base = {"rotate_prob": 1.0, "scale_prob": 1.0, "gamma_prob": 1.0, "noise_prob": 1.0}
    extra = {"blur_prob": 1.0, "contrast_prob": 1.0, "lowres_prob": 1.0, "gamma_invert_prob": 1.0,
             "gamma_retain_stats": True, "elastic_prob": 0.0}
    for cfg in (AugmentConfig(**base), AugmentConfig(**base, **extra)):
        p = DeviceAugment(cfg, (8,) * nd, 0, seed=11).draw(5, 2)
        assert p["matrix"].tolist() == old[0]
        assert p["mult"].tolist() == old[1] and p["shift"].tolist() == old[2] and p["gamma"].tolist() == old[3]
        assert p["sigma"] == old[4] and p["noise_seed"] == old[5]


def test_nnunet_preset_validates_and_matches_nnunet() -> None:
    for nd in (2, 3):
        cfg = AugmentConfig.nnunet(nd)
        cfg.validate()
        assert cfg.rotate_deg == (30.0 if nd == 3 else 180.0)
        assert (cfg.blur_prob, cfg.contrast_prob, cfg.lowres_prob, cfg.gamma_invert_prob) == (0.2, 0.15, 0.25, 0.1)
        assert cfg.elastic_prob == 0.0 and cfg.gamma_retain_stats and cfg.split_factor_ranges


# nnU-Net's set for the budget configs, as a YAML block under `data:` (what the integrator would paste into a config)
NNUNET_BLOCK = """
augment:
  intensity_scale: [0.75, 1.25]
  intensity_shift: 0.0
  intensity_prob: 0.15
  split_factor_ranges: true
  noise_prob: 0.1
  blur_prob: 0.2
  contrast_prob: 0.15
  lowres_prob: 0.25
  gamma_invert_prob: 0.1
  gamma_retain_stats: true
"""


@pytest.mark.parametrize(
    ("config", "nd"),
    [("brats_budget.yaml", 3), ("lgg_budget_unet.yaml", 2), ("lgg_budget_res_inception_unet.yaml", 2),
     ("lgg_budget_resnet50_unet.yaml", 2)],
)
def test_the_nnunet_block_loads_into_the_budget_configs(config: str, nd: int, tmp_path: Path) -> None:
    """The block above (+ rotate_deg 180 in 2D), merged into a shipped budget config or given as dotted overrides,
    resolves to `AugmentConfig.nnunet(nd)`; a shipped config without the block keeps the first version's defaults."""
    block = yaml.safe_load(NNUNET_BLOCK)["augment"]
    if nd == 2:
        block["rotate_deg"] = 180.0
    shipped = REPO / "configs" / config
    raw = yaml.safe_load(shipped.read_text())
    if "augment" not in raw["data"]:
        assert load_config(shipped).data.augment == AugmentConfig()
    raw["data"]["augment"] = block
    path = tmp_path / config
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).data.augment == AugmentConfig.nnunet(nd)
    overrides = [f"data.augment.{k}={json.dumps(v)}" for k, v in block.items()]
    assert load_config(shipped, overrides).data.augment == AugmentConfig.nnunet(nd)
