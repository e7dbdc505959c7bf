"""Augmentation, one implementation for 2D and 3D (they differ only in the number of spatial dims).

The work is split by cost:

* `apply_flips` (loader worker, numpy): flips are views, paid for by the collate copy; drawn in the sample plan.
* `DeviceAugment` (batched torch, normally on the accelerator inside the training step): rotation + scaling (+ an
  optional elastic displacement field) as ONE `affine_grid` + `grid_sample` over the resampled samples of the batch
  (image trilinear/bilinear, label nearest, so label values stay in the original set), the context margin cropped
  away in the same resampling; then per-channel intensity scale/shift (brightness), Gaussian blur, contrast,
  simulated low resolution, inverted gamma, gamma and Gaussian noise (nnU-Net's set; which ones run and how often
  is `AugmentConfig`). Its random draws come from (seed, global sample position), so a resumed run augments exactly
  as before, on any number of ranks. Every number the device needs travels in one pinned non-blocking copy per batch.

Without a context margin (`data.context_margin` 0) rotated / zoomed-out corners and elastic displacements past the
patch border sample zeros (the background value of z-scored cases).
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


def split_factors(u: np.ndarray, coin: np.ndarray, low: float, high: float) -> np.ndarray:
    """nnU-Net's `BGContrast` draw of factors around 1: uniform draws `u` in [0, 1) map to [low, min(high, 1)) where
    `coin` < 0.5 (and low < 1), else to [max(low, 1), high]; a range on one side of 1 stays on that side."""
    below = ((coin < 0.5) & (low < 1.0)) | (high <= 1.0)
    lo = np.where(below, low, max(low, 1.0))
    hi = np.where(below, min(high, 1.0), high)
    return lo + u * (hi - lo)


def gaussian_kernels(sigmas: np.ndarray, radius: int) -> np.ndarray:
    """(n, nd) standard deviations in voxels -> (n, nd, 2*radius + 1) normalised 1D Gaussian kernels (sigma 0 gives
    the identity kernel)."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    s = np.maximum(sigmas[..., None], 1e-6)
    k = np.exp(-0.5 * (x / s) ** 2)
    return k / k.sum(axis=-1, keepdims=True)


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
        self.blur_radius = max(1, math.ceil(3.0 * cfg.blur_sigma[1]))  # one kernel length for every blurred channel

    # ---- parameter draws (host, tiny) ----------------------------------------------------------------------
    def draw(self, index: int, channels: int) -> dict:
        """All random parameters of the sample at global position `index`, from (seed, index) only.

        Keys (None = transform not applied to this sample): matrix (nd, nd) output->input map in the (z, y, x)
        frame, elastic (nd, *[elastic_points]*nd) displacement lattice in input voxels, mult / shift (C,), blur
        (C, nd) sigmas in voxels (0 = channel not blurred), contrast (C,), lowres (C,) zooms (1 = channel kept),
        gamma_invert (C,), gamma (C,), sigma (noise std) and noise_seed."""
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
        # The draws of nnU-Net's additions come after the original ones: a config that leaves them off draws the
        # original parameters from the same stream positions, so it augments bit for bit as before.
        intensity_on = rng.random() < c.intensity_prob
        mult_split, gamma_split = rng.random((2, channels)), rng.random((2, channels))
        blur_on, blur_ch = rng.random() < c.blur_prob, rng.random(channels) < c.blur_channel_prob
        blur_sigma = rng.uniform(*c.blur_sigma, (channels, self.nd))
        contrast_on, contrast = rng.random() < c.contrast_prob, rng.random((2, channels))
        lowres_on, lowres_ch = rng.random() < c.lowres_prob, rng.random(channels) < c.lowres_channel_prob
        lowres_zoom = rng.uniform(*c.lowres_zoom, channels)
        ginv_on, ginv = rng.random() < c.gamma_invert_prob, rng.random((2, channels))
        elastic_on, magnitude = rng.random() < c.elastic_prob, rng.uniform(*c.elastic_magnitude, self.nd)
        elastic_seed = int(rng.integers(2**62))

        if c.split_factor_ranges:
            mult = split_factors(*mult_split, *c.intensity_scale)
            gamma = split_factors(*gamma_split, *c.gamma_range)
        if not intensity_on:
            mult, shift = np.ones(channels), np.zeros(channels)
        matrix = None
        if rot_on or scale_on or elastic_on:
            matrix = rotation_matrix(angles) if rot_on else np.eye(self.nd)
            if scale_on:
                matrix = matrix / zoom  # zoom > 1 samples a smaller region: zoom in
        return {
            "matrix": matrix,
            "elastic": self._lattice(elastic_seed, magnitude) if elastic_on else None,
            "mult": mult,
            "shift": shift,
            "blur": np.where(blur_ch[:, None], blur_sigma, 0.0) if blur_on and blur_ch.any() else None,
            "contrast": self._factors(contrast, c.contrast_range) if contrast_on else None,
            "lowres": np.where(lowres_ch, lowres_zoom, 1.0) if lowres_on and lowres_ch.any() else None,
            "gamma_invert": self._factors(ginv, c.gamma_range) if ginv_on else None,
            "gamma": gamma if gamma_on else None,
            "sigma": sigma if noise_on and sigma > 0 else None,
            "noise_seed": noise_seed,
        }

    def _factors(self, draws: np.ndarray, bounds: Sequence[float]) -> np.ndarray:
        """Per-channel factors from (2, C) uniform draws: split ranges (nnU-Net) or uniform over `bounds`."""
        if self.cfg.split_factor_ranges:
            return split_factors(draws[0], draws[1], *bounds)
        return bounds[0] + draws[0] * (bounds[1] - bounds[0])

    def _lattice(self, seed: int, magnitude: np.ndarray) -> np.ndarray:
        """(nd, *[points]*nd) displacements in input voxels, (z, y, x) components; component d peaks at
        magnitude[d] * patch[d]. Linear interpolation never exceeds its control values, so that is also the largest
        displacement in the patch."""
        pts = self.cfg.elastic_points
        lattice = np.random.default_rng(seed).standard_normal((self.nd, *([pts] * self.nd)))
        peak = np.abs(lattice).reshape(self.nd, -1).max(axis=1)
        scale = magnitude * np.array(self.patch_size) / np.maximum(peak, 1e-12)
        return lattice * scale.reshape(-1, *([1] * self.nd))

    # ---- application -----------------------------------------------------------------------------------------
    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        if self.margin == 0:
            return x
        m = self.margin
        return x[(..., *(slice(m, m + p) for p in self.patch_size))]

    def _spatial(
        self,
        image: torch.Tensor,
        label: torch.Tensor | None,
        sel: list[int],
        theta: torch.Tensor,
        elastic: list[int],
        lattices: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Resample samples `sel` (batch positions) with `theta` (len(sel), nd, nd + 1) on the device; output grid
        = patch, centred in the input. Samples `elastic` (positions in `sel`) add the displacement `lattices`
        (len(elastic), nd, *points) (normalised input units, (x, y, z) components), interpolated to the patch.
        Samples are picked with Python ints (views), never a device index tensor, whose creation would be a
        host-to-device copy."""
        whole = len(sel) == image.shape[0]
        src = image if whole else torch.stack([image[b] for b in sel])
        grid = F.affine_grid(theta, [len(sel), image.shape[1], *self.patch_size], align_corners=True)
        if elastic:
            mode = "trilinear" if self.nd == 3 else "bilinear"
            disp = F.interpolate(lattices, size=self.patch_size, mode=mode, align_corners=True)
            for k, j in enumerate(elastic):
                grid[j] += disp[k].movedim(0, -1)  # (nd, *P) -> (*P, nd), as the grid
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

    def _half_in(self, image_shape: Sequence[int]) -> np.ndarray:
        return np.array([(s - 1) / 2 for s in image_shape])

    def _thetas(self, image_shape: Sequence[int], mats: list[np.ndarray]) -> np.ndarray:
        """(n, nd, nd + 1) affine_grid matrices for (z,y,x)-frame matrices `mats` (input `image_shape` spatial)."""
        half_in = self._half_in(image_shape)
        half_out = np.array([(p - 1) / 2 for p in self.patch_size])
        thetas = []
        for a in mats:
            # normalised out coords -> normalised in coords (align_corners=True): D_in^-1 A D_out, then reversed
            # to grid_sample's (x, y, z) order.
            t = (a * half_out[None, :]) / np.maximum(half_in[:, None], 1e-6)
            t = t[::-1, ::-1]
            thetas.append(np.concatenate([t, np.zeros((self.nd, 1))], axis=1))
        return np.stack(thetas).reshape(len(mats), self.nd, self.nd + 1)

    def _normalised_lattices(self, image_shape: Sequence[int], lattices: list[np.ndarray]) -> np.ndarray:
        """Voxel lattices (nd, *pts) in the (z, y, x) frame -> grid_sample's normalised units, (x, y, z) order."""
        half_in = np.maximum(self._half_in(image_shape), 1e-6).reshape(-1, *([1] * self.nd))
        return np.stack([(lat / half_in)[::-1] for lat in lattices])

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

        def having(key: str) -> list[int]:
            return [j for j, p in enumerate(params) if p[key] is not None]

        sel, gam, ginv, con = having("matrix"), having("gamma"), having("gamma_invert"), having("contrast")
        elastic = [k for k, j in enumerate(sel) if params[j]["elastic"] is not None]  # positions in `sel`
        blurred = [(j, ch) for j in having("blur") for ch in range(c) if params[j]["blur"][ch].any()]
        # Every number the device needs travels in ONE pinned, non-blocking copy: torch.as_tensor(numpy,
        # device=cuda) from pageable memory would be a synchronising copy per tensor.
        parts = [
            np.stack([p["mult"] for p in params]).reshape(-1),
            np.stack([p["shift"] for p in params]).reshape(-1),
            np.stack([params[j]["gamma"] for j in gam]).reshape(-1) if gam else np.zeros(0),
            self._thetas(image.shape[2:], [params[j]["matrix"] for j in sel]).reshape(-1) if sel else np.zeros(0),
            np.stack([params[j]["gamma_invert"] for j in ginv]).reshape(-1) if ginv else np.zeros(0),
            np.stack([params[j]["contrast"] for j in con]).reshape(-1) if con else np.zeros(0),
            gaussian_kernels(np.stack([params[j]["blur"][ch] for j, ch in blurred]), self.blur_radius).reshape(-1)
            if blurred
            else np.zeros(0),
            self._normalised_lattices(image.shape[2:], [params[sel[k]]["elastic"] for k in elastic]).reshape(-1)
            if elastic
            else np.zeros(0),
        ]
        packed = to_device(np.concatenate(parts).astype(np.float32), image.device)
        mult, shift, gamma, theta, gamma_inv, contrast, kernels, lattices = torch.split(packed, [p.size for p in parts])
        if sel:
            pts = [self.cfg.elastic_points] * self.nd
            image, label = self._spatial(
                image, label, sel, theta.view(len(sel), self.nd, self.nd + 1),
                elastic, lattices.view(len(elastic), self.nd, *pts),
            )
        else:  # no sample needs resampling this step: a crop is exact and free
            image, label = self._crop(image).float(), None if label is None else self._crop(label)
        view = (b, c) + (1,) * self.nd
        image = torch.addcmul(shift.view(view), image, mult.view(view))  # a new tensor: the batch is untouched
        if blurred:
            self._blur(image, blurred, kernels.view(len(blurred), self.nd, 2 * self.blur_radius + 1))
        for j, bi in enumerate(con):
            image[bi] = self._contrast(image[bi], contrast[j * c : (j + 1) * c])
        for bi in having("lowres"):
            self._lowres(image[bi], params[bi]["lowres"])
        for j, bi in enumerate(ginv):
            image[bi] = self._gamma(image[bi], gamma_inv[j * c : (j + 1) * c], invert=True)
        for j, bi in enumerate(gam):
            image[bi] = self._gamma(image[bi], gamma[j * c : (j + 1) * c], invert=False)
        for i, p in enumerate(params):
            if p["sigma"] is not None:
                gen = torch.Generator(device=image.device).manual_seed(p["noise_seed"])
                noise = torch.randn(image.shape[1:], generator=gen, device=image.device, dtype=image.dtype)
                image[i] += noise * float(p["sigma"])
        return image, label

    # ---- intensity transforms on one sample x (C, *S) or on channels of the batch (in place) ------------------
    def _blur(self, image: torch.Tensor, pairs: list[tuple[int, int]], kernels: torch.Tensor) -> None:
        """Separable Gaussian blur of channels `pairs` ((sample, channel) of `image` (B, C, *S)), in place, with the
        symmetric `kernels` (len(pairs), nd, 2r + 1), borders replicated. Per axis a weighted sum of r + 1 shifted
        views for all pairs at once: on one CPU core twice as fast as a grouped convolution with (2r+1, 1, 1)
        kernels, and a handful of elementwise kernels on an accelerator."""
        n, r = len(pairs), self.blur_radius
        x = torch.stack([image[bi, ch] for bi, ch in pairs])  # (n, *S)
        view = (n,) + (1,) * self.nd
        for axis in range(self.nd):
            dim, length = 1 + axis, x.shape[1 + axis]
            pad = [0] * (2 * self.nd)  # F.pad lists the last dim first
            pad[2 * (self.nd - 1 - axis)] = pad[2 * (self.nd - 1 - axis) + 1] = r
            xp = F.pad(x.unsqueeze(0), pad, mode="replicate")[0]
            w = kernels[:, axis]
            out = xp.narrow(dim, r, length) * w[:, r].view(view)
            for j in range(1, r + 1):
                out += (xp.narrow(dim, r - j, length) + xp.narrow(dim, r + j, length)) * w[:, r + j].view(view)
            x = out
        for j, (bi, ch) in enumerate(pairs):
            image[bi, ch] = x[j]

    def _contrast(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """Per-channel contrast `factor` (C,) about the channel mean, clipped to the channel's range (nnU-Net's
        ContrastTransform with preserve_range)."""
        ones = (1,) * self.nd
        flat = x.flatten(1)
        mean = flat.mean(1).view(-1, *ones)
        lo, hi = (v.view(-1, *ones) for v in torch.aminmax(flat, dim=1))
        return torch.clamp((x - mean) * factor.view(-1, *ones) + mean, min=lo, max=hi)

    def _lowres(self, x: torch.Tensor, zooms: np.ndarray) -> None:
        """Simulated low resolution of the channels of x (C, *S) with zoom < 1, in place: nearest down to
        round(zoom * S) (at least 1), (bi/tri)linear back to S."""
        size = tuple(x.shape[1:])
        mode = "trilinear" if self.nd == 3 else "bilinear"
        for ch, z in enumerate(zooms):
            if z >= 1.0:
                continue
            small = [max(1, round(s * float(z))) for s in size]
            down = F.interpolate(x[ch][None, None], size=small, mode="nearest-exact")
            x[ch] = F.interpolate(down, size=size, mode=mode, align_corners=False)[0, 0]

    def _gamma(self, x: torch.Tensor, exponent: torch.Tensor, invert: bool) -> torch.Tensor:
        """Gamma with per-channel `exponent` (C,) of x (C, *S) rescaled to [0, 1] per channel, then back to the
        channel's range; `invert` applies it to -x and negates the result (nnU-Net's inverted gamma), computed as
        ``hi - ((hi - x) / span) ** g * span``. With `gamma_retain_stats` each channel's mean and standard
        deviation are restored afterwards."""
        c, ones = x.shape[0], (1,) * self.nd
        flat = x.flatten(1)
        if self.cfg.gamma_retain_stats:
            std, mean = (v.view(c, *ones) for v in torch.std_mean(flat, dim=1))
        lo, hi = (v.view(c, *ones) for v in torch.aminmax(flat, dim=1))
        span = (hi - lo).clamp_min(1e-7)
        g = exponent.view(c, *ones)
        # gamma on [0, 1]-rescaled intensities, then back to the original range (keeps min and max)
        if invert:
            y = hi - ((hi - x) / span).clamp(0, 1).pow(g) * span
        else:
            y = ((x - lo) / span).clamp(0, 1).pow(g) * span + lo
        if self.cfg.gamma_retain_stats:
            y_std, y_mean = (v.view(c, *ones) for v in torch.std_mean(y.flatten(1), dim=1))
            y = (y - y_mean) * (std / y_std.clamp_min(1e-7)) + mean
        return y


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device` without a host sync: pinned, then copied non-blocking (CUDA); as is on the CPU.

    The pinned buffer comes from torch's caching host allocator, which keeps it until the copy has finished."""
    t = torch.from_numpy(array)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
