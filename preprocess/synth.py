"""Synthetic data, deterministic by seed, for tests and the demo.

brats: BraTS 2021 layout `BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz`, int16, labels {0,1,2,4}.
A brain-shaped ellipsoid with smooth tissue texture (WM/GM/CSF-like classes with contrast-specific intensities),
a bias field and noise, and one irregular tumour whose sub-regions differ only by contrast:
- necrotic core (1): dark in t1/t1ce, bright in t2, dark in flair
- enhancing rim (4): bright in t1ce only
- oedema (2): bright in t2 and flair
so a model must combine the contrasts to separate them.
images2d: `images/case_XXXX.png` (grayscale) + `masks/case_XXXX.png` ({0,255}) with a bright irregular blob.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_BRATS_SHAPE = (96, 96, 64)  # (X, Y, Z)
DEFAULT_2D_SHAPE = (128, 128)
# Mean intensity per (tissue, contrast): rows WM, GM, CSF, necrosis, oedema, enhancing; cols t1, t1ce, t2, flair.
_INTENSITY = np.array([
    [700, 700, 300, 350],
    [500, 520, 450, 450],
    [200, 220, 900, 150],
    [250, 250, 1000, 300],
    [450, 450, 1100, 1000],
    [500, 1300, 600, 600],
], dtype=np.float32)
MODS = ("t1", "t1ce", "t2", "flair")


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Smooth random field in [0, 1]-ish: coarse uniform noise upsampled linearly to `shape`."""
    from scipy.ndimage import zoom

    coarse = rng.random(tuple(max(2, s // cells) for s in shape))
    return zoom(coarse, [s / c for s, c in zip(shape, coarse.shape, strict=True)], order=1, mode="nearest")


def synth_brats_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Returns images (4, X, Y, Z) int16 and seg (X, Y, Z) uint8 with values {0, 1, 2, 4}."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    radii = rng.uniform(0.75, 0.88, 3)
    r_brain = np.sqrt(sum((g / r) ** 2 for g, r in zip(grids, radii, strict=True)))
    brain = r_brain < 1.0
    texture = _smooth_noise(rng, shape, 6)
    tissue = np.where(texture > 0.55, 0, 1)  # WM / GM
    tissue = np.where((r_brain > 0.9) | (texture < 0.2), 2, tissue)  # CSF rim and pockets
    # Tumour: centre well inside the brain, irregular boundary from a smooth field.
    centre = rng.uniform(-0.35, 0.35, 3) * radii
    size = rng.uniform(0.22, 0.32)
    d = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))) / size
    d = d * (0.8 + 0.4 * _smooth_noise(rng, shape, 8))
    seg = np.zeros(shape, dtype=np.uint8)
    seg[(d < 1.0) & brain] = 2
    seg[(d < 0.6) & brain] = 4
    seg[(d < 0.4) & brain] = 1
    cls = tissue.copy()
    cls[seg == 1], cls[seg == 2], cls[seg == 4] = 3, 4, 5
    bias = 0.85 + 0.3 * _smooth_noise(rng, shape, 16)
    images = np.empty((4, *shape), dtype=np.int16)
    for m in range(4):
        base = _INTENSITY[cls, m] * bias * (0.95 + 0.1 * texture)
        vol = base + rng.normal(0, 25, shape).astype(np.float32)
        images[m] = np.where(brain, np.clip(np.rint(vol), 1, 32767), 0).astype(np.int16)
    return images, seg


def synth_2d_case(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Returns image (H, W) uint8 and mask (H, W) uint8 in {0, 255}."""
    yy, xx = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    head = (yy / 0.85) ** 2 + (xx / 0.75) ** 2 < 1
    tex = _smooth_noise(rng, shape, 8)
    cy, cx = rng.uniform(-0.4, 0.4, 2)
    r = rng.uniform(0.12, 0.25)
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / r * (0.8 + 0.4 * _smooth_noise(rng, shape, 10))
    tumour = (d < 1) & head
    img = np.where(head, 90 + 60 * tex, 0) + np.where(tumour, 80, 0) + rng.normal(0, 6, shape) * head
    return np.clip(img, 0, 255).astype(np.uint8), (tumour * 255).astype(np.uint8)


def write_synth(kind: str, n: int, dst: Path, seed: int = 0, shape: tuple[int, ...] | None = None) -> int:
    """Write `n` synthetic cases under `dst`; returns n. Case i depends only on (seed, i)."""
    import nibabel as nib
    from PIL import Image

    dst.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        if kind == "brats":
            shp = tuple(shape or DEFAULT_BRATS_SHAPE)
            if len(shp) != 3:
                raise ValueError(f"--shape {shp}: expected XxYxZ for brats")
            images, seg = synth_brats_case(rng, shp)  # type: ignore[arg-type]
            cid = f"BraTS2021_{i:05d}"
            case_dir = dst / cid
            case_dir.mkdir(exist_ok=True)
            affine = np.array([[-1, 0, 0, 0], [0, -1, 0, shp[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
            for m, mod in enumerate(MODS):
                nib.Nifti1Image(images[m], affine).to_filename(case_dir / f"{cid}_{mod}.nii.gz")
            nib.Nifti1Image(seg, affine).to_filename(case_dir / f"{cid}_seg.nii.gz")
        elif kind == "images2d":
            shp = tuple(shape or DEFAULT_2D_SHAPE)
            if len(shp) != 2:
                raise ValueError(f"--shape {shp}: expected HxW for images2d")
            img, mask = synth_2d_case(rng, shp)  # type: ignore[arg-type]
            (dst / "images").mkdir(exist_ok=True)
            (dst / "masks").mkdir(exist_ok=True)
            Image.fromarray(img).save(dst / "images" / f"case_{i:04d}.png")
            Image.fromarray(mask).save(dst / "masks" / f"case_{i:04d}.png")
        else:
            raise ValueError(f"unknown synth kind {kind!r}; expected 'brats' or 'images2d'")
    return n
