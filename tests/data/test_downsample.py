"""`data.downsample`: pooled images and labels, training batches planned and read in the pooled frame."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from distseg.data.config import DataConfig
from distseg.data.labels import BRATS_REGIONS
from distseg.data.loader import build_train_loader
from distseg.data.resample import downsample_image, downsample_label, pooled_shape
from distseg.data.store import Store


def _brute_pool(a: np.ndarray, f: int, axes: tuple[int, ...]) -> np.ndarray:
    """Mean over f-blocks along `axes` after zero-padding them to a multiple of f (reference implementation)."""
    pads = [(0, (-a.shape[i]) % f if i in axes else 0) for i in range(a.ndim)]
    a = np.pad(a.astype(np.float64), pads)
    shape = []
    for i, n in enumerate(a.shape):
        shape += [n // f, f] if i in axes else [n, 1]
    return a.reshape(shape).mean(axis=tuple(range(1, 2 * a.ndim, 2)))


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_pooling_matches_a_brute_force_mean_and_region_fractions(spatial_dims):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 7, 10, 9)).astype(np.float32)
    label = rng.integers(0, 4, size=(7, 10, 9)).astype(np.uint8)
    axes = (1, 2, 3) if spatial_dims == 3 else (2, 3)
    got = downsample_image(torch.from_numpy(image), 2, spatial_dims).numpy()
    np.testing.assert_allclose(got, _brute_pool(image, 2, axes), rtol=1e-5, atol=1e-6)
    assert got.shape[1:] == pooled_shape(label.shape, 2, spatial_dims)
    pooled = downsample_label(label, 2, BRATS_REGIONS, spatial_dims)
    for name, values in BRATS_REGIONS.items():
        frac = _brute_pool(np.isin(label, values)[None], 2, axes)[0]
        np.testing.assert_array_equal(np.isin(pooled, values), frac > 0.5, err_msg=name)


def test_training_batches_come_from_the_pooled_case(brats_store: Path):
    cfg = DataConfig(store=str(brats_store), patch_size=(6, 6, 6), batch_size=2, num_workers=0, val_folds=(0,),
                     downsample=2, foreground_fraction=0.5)
    loader = build_train_loader(cfg, rank=0, world_size=1, seed=3)
    store = Store.open(brats_store)
    dataset = loader.dataset
    for step, batch in enumerate(itertools.islice(iter(loader), 4)):
        assert batch["image"].shape == (2, 4, 6, 6, 6) and batch["label"].shape == (2, 6, 6, 6)
        for j in range(2):
            plan = dataset.sampler.plan(store, step * 2 + j)
            image, label = store.read_case(plan.case_id)
            pi = downsample_image(torch.from_numpy(image), 2).numpy()
            pl = downsample_label(label, 2, store.regions)
            box = tuple(slice(s, s + n) for s, n in zip(plan.start, plan.size, strict=True))
            assert all(s >= 0 for s in plan.start)  # bounded inside the pooled case (every case >= 6 pooled)
            want_img, want_lab = pi[(slice(None), *box)], pl[box]
            for axis in plan.flips:
                want_img, want_lab = np.flip(want_img, axis + 1), np.flip(want_lab, axis)
            np.testing.assert_allclose(batch["image"][j].numpy(), want_img, rtol=1e-6)
            np.testing.assert_array_equal(batch["label"][j].numpy(), want_lab)
            if plan.foreground:
                assert batch["label"][j].any()


def test_downsample_is_checked():
    with pytest.raises(ValueError, match="data.downsample"):
        DataConfig(store="x.zarr", downsample=0).validate()
