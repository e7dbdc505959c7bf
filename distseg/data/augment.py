"""Augmentation, one implementation for 2D and 3D (they differ only in the number of spatial dims).

The work is split by cost:

* `apply_flips` (loader worker, numpy): flips are views, paid for by the collate copy; drawn in the sample plan.
* `DeviceAugment` (batched torch, normally on the accelerator inside the training step): rotation +
  scaling as ONE `affine_grid` + `grid_sample` over the whole batch (image trilinear/bilinear, label nearest), the
  context margin cropped away in the same resampling, then per-channel intensity scale/shift, gamma and Gaussian
  noise. Its random draws come from (seed, global sample position), so a resumed run augments exactly as before, on
  any number of ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from distseg.data.config import AugmentConfig
from distseg.data.sampling import STREAM_DEVICE_AUG, sample_rng


def apply_flips(
    image: np.ndarray, label: np.ndarray | None, axes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Flip image (C, *S) and label (*S) along spatial `axes` (0-based over *S). Returns views (no copy): the
    caller's collate copy into the batch buffer is the only one."""
    if not axes:
        return image, label
    image = np.flip(image, axis=tuple(a + 1 for a in axes))
    if label is not None:
        label = np.flip(label, axis=tuple(axes))
    return image, label


def rotation_matrix(angles: Sequence[float]) -> np.ndarray:
    """Rotation in the (z, y, x) / (y, x) index frame: 1 angle (2D, in-plane) or 3 angles (3D, about z, y, x)."""
    if len(angles) == 1:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    rot = np.eye(3)
    for axis, a in enumerate(angles):  # rotate in the plane of the two axes other than `axis`
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        c, s = math.cos(a), math.sin(a)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = r @ rot
    return rot


class DeviceAugment:
    """Batched spatial + intensity augmentation; call as ``image, label = aug(image, label, sample_index)``.

    image: float (B, C, *(patch + 2*margin)); label: uint8 (B, *(patch + 2*margin)) or None;
    sample_index: int64 (B,) global sample positions (the loader's ``batch["sample_index"]``).
    Returns image float32 (B, C, *patch) and label uint8 (B, *patch) on the input's device. With augmentation
    disabled it only crops the margin. Not an nn.Module: it holds no parameters and no state besides its config.
    """

    def __init__(
        self, cfg: AugmentConfig, patch_size: Sequence[int], margin: int, seed: int, enabled: bool = True
    ) -> None:
        self.cfg = cfg
        self.patch_size = tuple(int(p) for p in patch_size)
        self.nd = len(self.patch_size)
        self.margin = int(margin)
        self.seed = int(seed)
        self.enabled = bool(enabled and cfg.enabled)

    # ---- parameter draws (host, tiny) ----------------------------------------------------------------------
    def draw(self, index: int, channels: int) -> dict[str, np.ndarray | float | None]:
        """All random parameters of the sample at global position `index`, from (seed, index) only."""
        c = self.cfg
        rng = sample_rng(self.seed, STREAM_DEVICE_AUG, index)
        # Draw every value unconditionally so each parameter's stream position never depends on the others.
        n_angles = 1 if self.nd == 2 else 3
        rot_on, angles = rng.random() < c.rotate_prob, rng.uniform(-1, 1, n_angles) * math.radians(c.rotate_deg)
        scale_on, zoom = rng.random() < c.scale_prob, rng.uniform(*c.scale_range)
        mult = rng.uniform(*c.intensity_scale, channels)
        shift = rng.uniform(-1, 1, channels) * c.intensity_shift
        gamma_on, gamma = rng.random() < c.gamma_prob, rng.uniform(*c.gamma_range, channels)
        noise_on, sigma = rng.random() < c.noise_prob, rng.uniform(0, c.noise_std)
        noise_seed = int(rng.integers(2**62))
        matrix = None
        if rot_on or scale_on:
            matrix = rotation_matrix(angles) if rot_on else np.eye(self.nd)
            if scale_on:
                matrix = matrix / zoom  # zoom > 1 samples a smaller region: zoom in
        return {
            "matrix": matrix,
            "mult": mult,
            "shift": shift,
            "gamma": gamma if gamma_on else None,
            "sigma": sigma if noise_on and sigma > 0 else None,
            "noise_seed": noise_seed,
        }

    # ---- application -----------------------------------------------------------------------------------------
    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        if self.margin == 0:
            return x
        m = self.margin
        return x[(..., *(slice(m, m + p) for p in self.patch_size))]

    def _spatial(
        self, image: torch.Tensor, label: torch.Tensor | None, sel: list[int], mats: list[np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Resample samples `sel` with their (z,y,x)-frame matrices; output grid = patch, centred in the input."""
        in_size = image.shape[2:]
        half_in = np.array([(s - 1) / 2 for s in in_size])
        half_out = np.array([(p - 1) / 2 for p in self.patch_size])
        thetas = []
        for a in mats:
            # normalised out coords -> normalised in coords (align_corners=True): D_in^-1 A D_out, then reversed
            # to grid_sample's (x, y, z) order.
            t = (a * half_out[None, :]) / np.maximum(half_in[:, None], 1e-6)
            t = t[::-1, ::-1]
            thetas.append(np.concatenate([t, np.zeros((self.nd, 1))], axis=1))
        theta = torch.as_tensor(np.stack(thetas), dtype=torch.float32, device=image.device)
        idx = torch.as_tensor(sel, device=image.device)
        src = image.index_select(0, idx).float()
        grid = F.affine_grid(theta, [len(sel), image.shape[1], *self.patch_size], align_corners=True)
        out_img = self._crop(image).float().clone()
        out_img[idx] = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out_lab = None
        if label is not None:
            lab = label.index_select(0, idx).unsqueeze(1).float()
            out_lab = self._crop(label).clone()
            warped = F.grid_sample(lab, grid, mode="nearest", padding_mode="zeros", align_corners=True)
            out_lab[idx] = warped.squeeze(1).round().to(label.dtype)
        return out_img, out_lab

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor | None, sample_index: torch.Tensor | Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        expected = tuple(p + 2 * self.margin for p in self.patch_size)
        if tuple(image.shape[2:]) != expected:
            raise ValueError(f"augment: image spatial shape {tuple(image.shape[2:])} != patch + 2*margin {expected}")
        if not self.enabled:
            return self._crop(image).float(), None if label is None else self._crop(label)
        indices = [int(i) for i in (sample_index.tolist() if torch.is_tensor(sample_index) else sample_index)]
        params = [self.draw(i, image.shape[1]) for i in indices]
        sel = [b for b, p in enumerate(params) if p["matrix"] is not None]
        if sel:
            image, label = self._spatial(image, label, sel, [params[b]["matrix"] for b in sel])
        else:  # no sample needs resampling this step: a crop is exact and free
            image, label = self._crop(image).float(), None if label is None else self._crop(label)
        return self._intensity(image, params), label  # intensity output is a new contiguous tensor

    def _intensity(self, image: torch.Tensor, params: list[dict]) -> torch.Tensor:
        """Per-channel scale/shift on every sample, then gamma and noise on the selected ones. image (B, C, *S)."""
        dev, b, c = image.device, image.shape[0], image.shape[1]
        view = (b, c) + (1,) * self.nd
        mult = torch.as_tensor(np.stack([p["mult"] for p in params]), dtype=image.dtype, device=dev).view(view)
        shift = torch.as_tensor(np.stack([p["shift"] for p in params]), dtype=image.dtype, device=dev).view(view)
        image = torch.addcmul(shift, image, mult)  # one pass, and a new tensor: the caller's batch is untouched
        gam = [i for i, p in enumerate(params) if p["gamma"] is not None]
        if gam:
            idx = torch.as_tensor(gam, device=dev)
            x = image.index_select(0, idx)
            flat = x.flatten(2)
            lo = flat.amin(dim=2).view(len(gam), c, *(1,) * self.nd)
            hi = flat.amax(dim=2).view(len(gam), c, *(1,) * self.nd)
            rng_ = (hi - lo).clamp_min(1e-7)
            g = torch.as_tensor(np.stack([params[i]["gamma"] for i in gam]), dtype=x.dtype, device=dev)
            # gamma on [0, 1]-rescaled intensities, then back to the original range (keeps min and max)
            image[idx] = ((x - lo) / rng_).clamp(0, 1).pow(g.view(len(gam), c, *(1,) * self.nd)) * rng_ + lo
        for i, p in enumerate(params):
            if p["sigma"] is not None:
                gen = torch.Generator(device=dev).manual_seed(p["noise_seed"])
                noise = torch.randn(image.shape[1:], generator=gen, device=dev, dtype=image.dtype)
                image[i] += noise * float(p["sigma"])
        return image

