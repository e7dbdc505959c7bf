"""Training and predicting at 1/f of the stored resolution (`data.downsample`): one definition of the pooling.

Images are average-pooled; labels are pooled per region (each region's voxel fraction > 0.5) and painted back
into canonical labels in region order, so the pooled label decodes to the same nested regions (BraTS WT/TC/ET).
Each pooled axis is zero-padded at its high end to a multiple of f first. 3D models pool (Z, Y, X); 2D models
(slice2d / image2d) pool in-plane only. `upsample_logits` interpolates predictions back (whole cases in
`distseg.inference.window.case_logits`, validation crops in `distseg.train.validation.crop_logits`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from distseg.data.targets import region_paint_values


def pooled_shape(shape: Sequence[int], factor: int, spatial_dims: int = 3) -> tuple[int, ...]:
    """(Z, Y, X) after pooling by `factor` (ceil; Z kept for 2D models)."""
    out = [-(-int(s) // factor) for s in shape]
    if spatial_dims == 2:
        out[0] = int(shape[0])
    return tuple(out)


def _kernel(factor: int, spatial_dims: int) -> tuple[int, int, int]:
    return (factor,) * 3 if spatial_dims == 3 else (1, factor, factor)


def _pool(x: torch.Tensor, kernel: tuple[int, int, int]) -> torch.Tensor:
    """(N, *S) float -> average-pooled (N, *S / kernel) after zero-padding each axis to a multiple."""
    pads: list[int] = []
    for size, k in zip(reversed(x.shape[1:]), reversed(kernel), strict=True):
        pads += [0, (-size) % k]
    return F.avg_pool3d(F.pad(x[None], pads), kernel)[0]


def downsample_image(image: torch.Tensor, factor: int, spatial_dims: int = 3) -> torch.Tensor:
    """image (C, Z, Y, X) -> average-pooled by `factor` along the last `spatial_dims` axes (Z untouched for 2D
    models), after zero-padding each pooled axis at its high end to a multiple of `factor`. The one definition
    shared by training batches, validation and prediction (`data.downsample`)."""
    if factor == 1:
        return image
    return _pool(image, _kernel(factor, spatial_dims))


def upsample_logits(low: torch.Tensor, factor: int, spatial_dims: int, shape: Sequence[int]) -> torch.Tensor:
    """Logits computed at 1/`factor` (N, K, z, y, x) -> (N, K, *shape) on the stored grid: trilinear interpolation
    (in-plane only for 2D models: scale 1 along Z is exact), cropped to `shape` (Z, Y, X), which undoes the
    high-end padding of `downsample_image`."""
    if factor == 1:
        return low
    up = F.interpolate(low, scale_factor=_kernel(factor, spatial_dims), mode="trilinear", align_corners=False)
    return up[(..., *(slice(0, int(s)) for s in shape))]


def downsample_label(label: np.ndarray, factor: int, regions: Mapping[str, Sequence[int]],
                     spatial_dims: int = 3) -> np.ndarray:
    """Canonical label (Z, Y, X) uint8 -> pooled label: each region's fraction > 0.5, painted in region order."""
    if factor == 1:
        return label
    lab = torch.from_numpy(np.ascontiguousarray(label))
    masks = torch.stack([torch.isin(lab, torch.tensor(list(v), dtype=lab.dtype)).float() for v in regions.values()])
    frac = _pool(masks, _kernel(factor, spatial_dims))
    out = np.zeros(frac.shape[1:], dtype=np.uint8)
    for value, f in zip(region_paint_values(regions), frac, strict=True):
        out[(f > 0.5).numpy()] = value
    return out
