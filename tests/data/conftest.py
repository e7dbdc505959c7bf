"""Tiny real Zarr stores for the data-pipeline tests, written with the store writer (`preprocess.writer`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distseg.data.labels import BINARY_LABEL_VALUES, BINARY_REGIONS, BRATS_LABEL_VALUES, BRATS_REGIONS
from preprocess.writer import Layout, init_store, root_attrs_base, write_case

# Keep tests lean on a shared 2-core machine.
torch.set_num_threads(1)


def _blob_label(shape: tuple[int, ...], centre: np.ndarray, radius: float) -> np.ndarray:
    """Concentric BraTS-like tumour: edema (2) shell, enhancing (3) rim, necrosis (1) core."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    d = np.linalg.norm(grid - centre, axis=-1)
    label = np.zeros(shape, np.uint8)
    label[d <= radius] = 2
    label[d <= 0.7 * radius] = 3
    label[d <= 0.4 * radius] = 1
    return label


def _foreground(label: np.ndarray) -> dict[int, np.ndarray]:
    return {int(c): np.argwhere(label == c) for c in np.unique(label) if c != 0}


def write_brats_store(path: Path, n_cases: int = 6, seed: int = 0) -> Path:
    """3D store: cases of (4, Z, Y, X) int16 raw intensities, a small tumour each, folds 0,1,2,0,1,2..."""
    rng = np.random.default_rng(seed)
    init_store(path, root_attrs_base("brats3d", ["t1", "t1ce", "t2", "flair"], BRATS_LABEL_VALUES, BRATS_REGIONS))
    for i in range(n_cases):
        shape = (20 + 2 * i, 28, 32 - i)
        label = _blob_label(shape, rng.uniform(4, np.array(shape) - 4), radius=3.5)
        image = rng.integers(50, 200, size=(4, *shape)).astype(np.int16)
        image[:, label > 0] += 300
        image[:, :, :2] = 0  # an empty border, like skull-stripped MRI
        attrs = {
            "case_id": f"case{i:02d}",
            "spacing": [1.0, 1.0, 1.0],
            "fold": i % 3,
            "normalization": {"applied": False, "mask": "nonzero_any", "mean": [150.0] * 4, "std": [100.0] * 4},
        }
        write_case(path, f"case{i:02d}", image, label, _foreground(label), attrs, Layout(chunks_zyx=(8, 16, 16)))
    return path


def write_image_store(path: Path, n_cases: int = 5, seed: int = 1) -> Path:
    """2D store: Z = 1 gray images of varied size with binary masks (one empty), folds 0,1,0,1,..."""
    rng = np.random.default_rng(seed)
    init_store(path, root_attrs_base("images2d", ["gray"], BINARY_LABEL_VALUES, BINARY_REGIONS))
    for i in range(n_cases):
        shape = (1, 30 + 3 * i, 26 + i)
        label = np.zeros(shape, np.uint8)
        if i != 2:
            label = (_blob_label(shape[1:], rng.uniform(5, np.array(shape[1:]) - 5), radius=4) > 0)[None]
            label = label.astype(np.uint8)
        image = rng.integers(0, 120, size=(1, *shape)).astype(np.uint8)
        image[:, label > 0] = 250
        attrs = {
            "case_id": f"img{i:02d}",
            "spacing": [1.0, 1.0, 1.0],
            "fold": i % 2,
            "normalization": {"applied": False, "mask": "all", "mean": [100.0], "std": [50.0]},
        }
        write_case(path, f"img{i:02d}", image, label, _foreground(label), attrs, Layout(chunks_zyx=(1, 16, 16)))
    return path


@pytest.fixture(scope="session")
def brats_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_brats_store(tmp_path_factory.mktemp("stores") / "tiny3d.zarr")


@pytest.fixture(scope="session")
def image_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_store(tmp_path_factory.mktemp("stores") / "tiny2d.zarr")


@pytest.fixture(scope="session")
def real_brats_store(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 3 real BraTS 2018 samples converted by the real converter (`python -m preprocess brats --serial`)."""
    import subprocess
    import sys

    dst = tmp_path_factory.mktemp("real")
    subprocess.run(
        [sys.executable, "-m", "preprocess", "brats", "--src", str(shared_data / "brats2018"), "--dst", str(dst),
         "--serial", "--folds", "3"],
        check=True, capture_output=True,
    )
    return dst / "brats.zarr"
