"""Undo preprocessing geometry: a stored-frame array back to the source grid (crop, axis order, 2D resize)."""

from __future__ import annotations

from typing import Any

import numpy as np

from distseg.data.labels import to_source_convention
from distseg.data.layout import StoreError


def restore_to_source_geometry(label: np.ndarray, attrs: dict[str, Any], source_convention: bool = True) -> np.ndarray:
    """Undo crop + axis transpose for a stored-frame label volume (Z, Y, X), e.g. a prediction.

    Returns the volume in the source array order (NIfTI: (X, Y, Z), to be saved with `attrs["affine"]`; 2D: (H, W)
    at the original size) in the source label convention when `source_convention` is true.
    """
    out = paste_to_source(np.asarray(label), attrs)
    if source_convention:
        out = to_source_convention(out, attrs["label_convention"])
    return out


def paste_to_source(volume: np.ndarray, attrs: dict[str, Any]) -> np.ndarray:
    """A stored-frame array (Z, Y, X) of any dtype -> the source grid: pasted into the uncropped volume (0 outside
    the crop box), transposed to the source axis order, and for resized 2D cases resized back to the source size
    (nearest for integer/bool labels, bilinear for floating-point maps such as probabilities)."""
    expected = tuple(attrs["shape"][1:])
    if volume.shape != expected:
        raise StoreError(f"case {attrs.get('case_id')!r}: array shape {volume.shape} != stored shape {expected}")
    if attrs.get("resized_from") is not None:  # 2D case resized on conversion: back to the source size
        from PIL import Image

        h, w = attrs["resized_from"]
        if volume.dtype.kind == "f":
            im = Image.fromarray(volume[0].astype(np.float32), mode="F").resize((w, h), Image.BILINEAR)
            volume = np.asarray(im).astype(volume.dtype)[None]
        else:
            im = Image.fromarray(volume[0].astype(np.uint8)).resize((w, h), Image.NEAREST)
            volume = np.asarray(im).astype(volume.dtype)[None]
    full = np.zeros(tuple(attrs["original_shape_zyx"]), dtype=volume.dtype)
    box = tuple(slice(lo, hi) for lo, hi in attrs["crop_box_zyx"])
    full[box] = volume
    out = full.transpose(attrs["store_to_source_axes"])
    if attrs.get("source_ndim") == 2:  # 2D sources are stored with Z = 1
        out = out[0]
    return out
