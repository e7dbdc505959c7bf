"""Segmentation overlays: region masks painted over a grey image, shared by TensorBoard (training, evaluation) and
the PNG outputs of `launch/predict.py`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Region colours (RGB) in channel order: BraTS WT green, TC yellow, ET red; further channels cycle the rest.
PALETTE = ((0, 200, 0), (255, 220, 0), (230, 0, 0), (0, 120, 255), (255, 0, 255), (0, 230, 230))
FILL_ALPHA = 0.35
SEPARATOR_PX = 2


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boolean (H, W) -> pixels of the mask that have a 4-neighbour outside it (image border counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def paint_masks(grey: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """grey (H, W) (or an RGB background (H, W, 3)) in [0, 1], masks bool (K, H, W) -> float RGB (H, W, 3):
    translucent fill + solid outline per channel, drawn in channel order so nested BraTS regions (WT ⊃ TC ⊃ ET)
    stay visible."""
    rgb = np.repeat(grey[..., None], 3, axis=-1) if grey.ndim == 2 else np.array(grey, dtype=np.float32)
    for k, mask in enumerate(masks):
        colour = np.asarray(PALETTE[k % len(PALETTE)], dtype=np.float32) / 255.0
        rgb[mask] = (1.0 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * colour
        rgb[_outline(mask)] = colour
    return rgb


def _pick_slice(image: np.ndarray, label: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, ...]:
    """For 3D inputs (C, Z, H, W) keep the axial slice with the most ground-truth foreground (prediction if none)."""
    area = label.reshape(label.shape[0], label.shape[1], -1).sum((0, 2))
    if not area.any():
        area = pred.reshape(pred.shape[0], pred.shape[1], -1).sum((0, 2))
    z = int(np.argmax(area)) if area.any() else label.shape[1] // 2
    return image[:, z], label[:, z], pred[:, z]


def render_overlay(image: Any, label: Any, pred: Any, channel: int = 0) -> np.ndarray:
    """RGB uint8 (3, H, 2W + 2): ground truth (left) and prediction (right) over input channel `channel` in grey.

    image (C, H, W) float; label, pred (K, H, W) binary masks or probabilities (> 0.5 counts as foreground).
    3D inputs (C, Z, H, W) / (K, Z, H, W) are reduced to the slice with the most ground-truth foreground.
    """
    image, label, pred = _numpy(image), _numpy(label), _numpy(pred)
    if image.ndim == 4:
        if label.ndim != 4 or pred.ndim != 4:
            raise ValueError(f"overlay: 3D image {image.shape} needs 3D label/pred (K, Z, H, W), got {label.shape}, "
                             f"{pred.shape}")
        image, label, pred = _pick_slice(image, label, pred)
    if image.ndim != 3 or label.ndim != 3 or label.shape != pred.shape or label.shape[1:] != image.shape[1:]:
        raise ValueError(f"overlay: expected image (C, H, W) and label, pred (K, H, W) with equal H, W; got "
                         f"{image.shape}, {label.shape}, {pred.shape}")
    if not 0 <= channel < image.shape[0]:
        raise ValueError(f"overlay: channel {channel} out of range for an image with {image.shape[0]} channels")
    grey = image[channel].astype(np.float32)
    low, high = float(grey.min()), float(grey.max())
    grey = (grey - low) / (high - low) if high > low else np.zeros_like(grey)
    left, right = paint_masks(grey, label > 0.5), paint_masks(grey, pred > 0.5)
    gap = np.ones((grey.shape[0], SEPARATOR_PX, 3), dtype=np.float32)
    rgb = np.concatenate([left, gap, right], axis=1)
    return np.ascontiguousarray((rgb * 255.0 + 0.5).astype(np.uint8).transpose(2, 0, 1))
