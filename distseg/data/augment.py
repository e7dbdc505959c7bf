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
        self, image: torch.Tensor, label: torch.Tensor | None, sel: list[int], theta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Resample samples `sel` (batch positions) with `theta` (len(sel), nd, nd + 1) on the device; output grid
        = patch, centred in the input. Samples are picked with Python ints (views), never a device index tensor,
        whose creation would be a host-to-device copy."""
        whole = len(sel) == image.shape[0]
        src = image if whole else torch.stack([image[b] for b in sel])
        grid = F.affine_grid(theta, [len(sel), image.shape[1], *self.patch_size], align_corners=True)
        warped = F.grid_sample(src.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        if whole:
            out_img = warped
        else:
            out_img = self._crop(image).float().clone()
            for j, b in enumerate(sel):
                out_img[b] = warped[j]
        out_lab = None
        if label is not None:
            lab = (label if whole else torch.stack([label[b] for b in sel])).unsqueeze(1).float()
            warped_lab = F.grid_sample(lab, grid, mode="nearest", padding_mode="zeros", align_corners=True)
            warped_lab = warped_lab.squeeze(1).round().to(label.dtype)
            if whole:
                out_lab = warped_lab
            else:
                out_lab = self._crop(label).clone()
                for j, b in enumerate(sel):
                    out_lab[b] = warped_lab[j]
        return out_img, out_lab

    def _thetas(self, image_shape: Sequence[int], mats: list[np.ndarray]) -> np.ndarray:
        """(n, nd, nd + 1) affine_grid matrices for (z,y,x)-frame matrices `mats` (input `image_shape` spatial)."""
        half_in = np.array([(s - 1) / 2 for s in image_shape])
        half_out = np.array([(p - 1) / 2 for p in self.patch_size])
        thetas = []
        for a in mats:
            # normalised out coords -> normalised in coords (align_corners=True): D_in^-1 A D_out, then reversed
            # to grid_sample's (x, y, z) order.
            t = (a * half_out[None, :]) / np.maximum(half_in[:, None], 1e-6)
            t = t[::-1, ::-1]
            thetas.append(np.concatenate([t, np.zeros((self.nd, 1))], axis=1))
        return np.stack(thetas).reshape(len(mats), self.nd, self.nd + 1)

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor | None, sample_index: torch.Tensor | Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        expected = tuple(p + 2 * self.margin for p in self.patch_size)
        if tuple(image.shape[2:]) != expected:
            raise ValueError(f"augment: image spatial shape {tuple(image.shape[2:])} != patch + 2*margin {expected}")
        if not self.enabled:
            return self._crop(image).float(), None if label is None else self._crop(label)
        # sample_index is the loader's CPU tensor: .tolist() reads host memory, no device sync.
        indices = [int(i) for i in (sample_index.tolist() if torch.is_tensor(sample_index) else sample_index)]
        b, c = image.shape[0], image.shape[1]
        params = [self.draw(i, c) for i in indices]
        sel = [j for j, p in enumerate(params) if p["matrix"] is not None]
        gam = [j for j, p in enumerate(params) if p["gamma"] is not None]
        # Every number the device needs travels in ONE pinned, non-blocking copy: torch.as_tensor(numpy,
        # device=cuda) from pageable memory would be a synchronising copy per tensor.
        parts = [
            np.stack([p["mult"] for p in params]).reshape(-1),
            np.stack([p["shift"] for p in params]).reshape(-1),
            np.stack([params[j]["gamma"] for j in gam]).reshape(-1) if gam else np.zeros(0),
            self._thetas(image.shape[2:], [params[j]["matrix"] for j in sel]).reshape(-1) if sel else np.zeros(0),
        ]
        packed = to_device(np.concatenate(parts).astype(np.float32), image.device)
        mult, shift, gamma, theta = torch.split(packed, [p.size for p in parts])
        if sel:
            image, label = self._spatial(image, label, sel, theta.view(len(sel), self.nd, self.nd + 1))
        else:  # no sample needs resampling this step: a crop is exact and free
            image, label = self._crop(image).float(), None if label is None else self._crop(label)
        view = (b, c) + (1,) * self.nd
        image = torch.addcmul(shift.view(view), image, mult.view(view))  # a new tensor: the batch is untouched
        return self._gamma_noise(image, params, gam, gamma.view(len(gam), c)), label

    def _gamma_noise(
        self, image: torch.Tensor, params: list[dict], gam: list[int], gamma: torch.Tensor
    ) -> torch.Tensor:
        """Gamma on samples `gam` (exponents `gamma` (len(gam), C)), then noise where drawn. image (B, C, *S)."""
        c = image.shape[1]
        ones = (1,) * self.nd
        for j, b in enumerate(gam):
            x = image[b]
            flat = x.flatten(1)
            lo, hi = flat.amin(dim=1).view(c, *ones), flat.amax(dim=1).view(c, *ones)
            span = (hi - lo).clamp_min(1e-7)
            # gamma on [0, 1]-rescaled intensities, then back to the original range (keeps min and max)
            image[b] = ((x - lo) / span).clamp(0, 1).pow(gamma[j].view(c, *ones)) * span + lo
        for i, p in enumerate(params):
            if p["sigma"] is not None:
                gen = torch.Generator(device=image.device).manual_seed(p["noise_seed"])
                noise = torch.randn(image.shape[1:], generator=gen, device=image.device, dtype=image.dtype)
                image[i] += noise * float(p["sigma"])
        return image


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device` without a host sync: pinned, then copied non-blocking (CUDA); as is on the CPU.

    The pinned buffer comes from torch's caching host allocator, which keeps it until the copy has finished."""
    t = torch.from_numpy(array)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
