"""Segmentation overlays: region masks painted over a grey image, shared by TensorBoard (training, evaluation) and
the PNG outputs of `launch/predict.py` / `launch/evaluate.py`.

`render_overlay` is the compact TensorBoard image (ground truth | prediction at the data's own size).
`overlay_figure` is the PNG a person opens: panels image | prediction | ground truth (when there is one), each at
least `MIN_PANEL_PX` on its shorter side (masks upscaled by nearest neighbour, so no label is invented between
voxels), a title over each panel and a colour legend with the region names under them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# Region colours (RGB) in channel order: BraTS WT green, TC yellow, ET red; further channels cycle the rest.
PALETTE = ((0, 200, 0), (255, 220, 0), (230, 0, 0), (0, 120, 255), (255, 0, 255), (0, 230, 230))
FILL_ALPHA = 0.35
SEPARATOR_PX = 2
MIN_PANEL_PX = 480
"""Shorter side of each panel of `overlay_figure`, in pixels (a 130x170 slice is shown 4x: 520x680)."""
STRIP_RGB = (24, 24, 24)
TEXT_RGB = (235, 235, 235)


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boolean (H, W) -> pixels of the mask that have a 4-neighbour outside it (image border counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _thick_outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of the mask within `width` pixels (4-neighbour steps) of its edge."""
    inner = mask
    for _ in range(width):
        inner = inner & ~_outline(inner)
    return mask & ~inner


def paint_masks(grey: np.ndarray, masks: np.ndarray, outline_px: int = 1) -> np.ndarray:
    """grey (H, W) (or an RGB background (H, W, 3)) in [0, 1], masks bool (K, H, W) -> float RGB (H, W, 3):
    translucent fill + solid outline (`outline_px` wide) per channel, drawn in channel order so nested BraTS regions
    (WT ⊃ TC ⊃ ET) stay visible."""
    rgb = np.repeat(grey[..., None], 3, axis=-1) if grey.ndim == 2 else np.array(grey, dtype=np.float32)
    for k, mask in enumerate(masks):
        colour = np.asarray(PALETTE[k % len(PALETTE)], dtype=np.float32) / 255.0
        rgb[mask] = (1.0 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * colour
        rgb[_outline(mask) if outline_px <= 1 else _thick_outline(mask, outline_px)] = colour
    return rgb


def upscale_factor(height: int, width: int, min_px: int = MIN_PANEL_PX) -> int:
    """The integer factor that brings the shorter side to at least `min_px` (1 when it already is)."""
    return max(1, math.ceil(min_px / max(1, min(height, width))))


def _nearest(masks: np.ndarray, k: int) -> np.ndarray:
    """bool (K, H, W) -> (K, kH, kW), each pixel repeated k x k times."""
    return masks if k == 1 else masks.repeat(k, axis=-2).repeat(k, axis=-1)


def _smooth(background: np.ndarray, k: int) -> np.ndarray:
    """float (H, W) or (H, W, 3) in [0, 1] -> k times larger, bilinear (the image only; masks stay nearest)."""
    if k == 1:
        return background.astype(np.float32)
    from PIL import Image

    size = (background.shape[1] * k, background.shape[0] * k)
    planes = background[..., None] if background.ndim == 2 else background
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(planes[..., c], dtype=np.float32), mode="F")
                      .resize(size, Image.BILINEAR)) for c in range(planes.shape[-1])]
    return np.clip(np.stack(out, axis=-1)[..., 0] if background.ndim == 2 else np.stack(out, axis=-1), 0.0, 1.0)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # FreeType build of Pillow (every wheel): a scalable font
    except (TypeError, OSError):  # an old Pillow or one without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def overlay_figure(background: np.ndarray, pred: np.ndarray, gt: np.ndarray | None, names: Sequence[str],
                   title: str = "", background_name: str = "image", min_px: int = MIN_PANEL_PX) -> np.ndarray:
    """The overlay PNG of one slice: RGB uint8 (H', W', 3).

    background (H, W) grey or (H, W, 3) RGB in [0, 1]; pred, gt bool (K, H, W) region masks in the order of `names`
    (gt None: no ground-truth panel). Panels left to right: the image alone, the prediction, the ground truth; each
    upscaled by one integer factor so its shorter side is >= `min_px` (image bilinear, masks nearest). A strip
    above holds `title` and the panel names; a strip below holds the legend (a swatch of each region's colour and
    its name)."""
    from PIL import Image, ImageDraw

    pred = np.asarray(pred, dtype=bool)
    if pred.ndim != 3 or pred.shape[1:] != background.shape[:2] or len(names) != pred.shape[0]:
        raise ValueError(f"overlay: expected background (H, W[, 3]) and pred (K, H, W) with K = {len(names)} names; "
                         f"got {background.shape}, {pred.shape}")
    if gt is not None and np.shape(gt) != pred.shape:
        raise ValueError(f"overlay: ground truth {np.shape(gt)} and prediction {pred.shape} differ in shape")
    k = upscale_factor(*pred.shape[1:], min_px=min_px)
    outline = max(1, k // 2)
    base = _smooth(np.asarray(background, dtype=np.float32), k)
    panels = [(background_name, paint_masks(base, np.zeros((0, *base.shape[:2]), bool))),
              ("prediction", paint_masks(base, _nearest(pred, k), outline))]
    if gt is not None:
        panels.append(("ground truth", paint_masks(base, _nearest(np.asarray(gt, dtype=bool), k), outline)))
    height, width = base.shape[:2]
    gap = 4
    font = _font(max(14, min(28, height // 24)))
    line = font.getbbox("Ag")[3] + 8
    top = line * (2 if title else 1)
    bottom = line + 12
    canvas = Image.new("RGB", (len(panels) * width + (len(panels) - 1) * gap, top + height + bottom), STRIP_RGB)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 4), title, fill=TEXT_RGB, font=font)
    for i, (name, rgb) in enumerate(panels):
        x = i * (width + gap)
        canvas.paste(Image.fromarray((rgb * 255.0 + 0.5).astype(np.uint8)), (x, top))
        draw.text((x + 6, top - line + 4), name, fill=TEXT_RGB, font=font)
    x, swatch = 6, line - 8
    y = top + height + 6
    for j, name in enumerate(names):  # the legend: colour swatch, region name
        draw.rectangle((x, y, x + swatch, y + swatch), fill=PALETTE[j % len(PALETTE)])
        draw.text((x + swatch + 6, y - 2), str(name), fill=TEXT_RGB, font=font)
        x += swatch + 18 + int(draw.textlength(str(name), font=font))
    return np.asarray(canvas)


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
