"""Typed configuration of the training data pipeline (the `data:` section of an experiment config).

Every field has a docstring under it; `DataConfig.validate()` raises `ValueError` naming the full dotted key
(e.g. ``data.patch_size``) and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("patch3d", "slice2d", "image2d")
TARGETS = ("regions", "binary")


def _is_int_tuple(value: object, n: int | None = None) -> bool:
    ok = isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return ok and (n is None or len(value) == n)


def _is_num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _range(key: str, value: object, lo: float, hi: float | None = None) -> None:
    """Check a (low, high) pair with lo <= low <= high (<= hi)."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_num(v) for v in value)):
        raise ValueError(f"{key}: expected a pair of numbers (low, high), got {value!r}")
    low, high = value
    if low > high or low < lo or (hi is not None and high > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{key}: expected low <= high within {bound}, got {list(value)}")


def _prob(key: str, value: object) -> None:
    if not _is_num(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{key}: expected a probability in [0, 1], got {value!r}")


@dataclass
class AugmentConfig:
    """Random augmentation of training samples; one implementation for 2D and 3D.

    Flips run in loader workers; the spatial transform (rotation + scaling + optional elastic deformation) and the
    intensity transforms run batched on the device (`distseg.data.augment.DeviceAugment`), in this order: spatial,
    intensity scale/shift (brightness), blur, contrast, simulated low resolution, inverted gamma, gamma, noise.
    Every transform added after the first version (blur, contrast, low resolution, inverted gamma, retained gamma
    statistics, split factor ranges, elastic, `intensity_prob` < 1) is off by default, so a config that does not set
    them augments exactly as before.

    nnU-Net v2's default set (`nnUNetTrainer.get_training_transforms`) is `AugmentConfig.nnunet(spatial_dims)`:
    rotation +-30 deg (3D) / +-180 deg (2D) and zoom 0.7..1.4 each with p 0.2, no elastic, noise std <= 0.1 p 0.1,
    blur sigma 0.5..1 p 0.2 (each channel p 0.5), brightness 0.75..1.25 p 0.15, contrast 0.75..1.25 p 0.15, low
    resolution 0.5..1 p 0.25 (each channel p 0.5), inverted gamma p 0.1 and gamma p 0.3 (0.7..1.5, statistics
    retained), factors drawn from nnU-Net's split ranges, mirroring on every axis.
    """

    enabled: bool = True
    """Master switch; False yields the raw crops (validation never augments)."""
    on_device: bool = True
    """Run rotation/scaling and intensity transforms batched in the training step (`DeviceAugment`, on the
    accelerator); False runs the same transforms on CPU in the loader workers (flips always run in workers)."""
    flip_axes: tuple[int, ...] = (0, 1, 2)
    """Spatial axes (0-based over the patch dims, (Z,Y,X) or (Y,X)) each flipped with probability 0.5.
    Axes beyond the patch dimensionality are ignored, so the 3D default also serves 2D."""
    rotate_deg: float = 30.0
    """Maximum absolute rotation angle in degrees, drawn uniformly per axis (in-plane only for 2D)."""
    rotate_prob: float = 0.2
    """Probability that a sample is rotated."""
    scale_range: tuple[float, float] = (0.7, 1.4)
    """Range of the isotropic zoom factor (>1 zooms in)."""
    scale_prob: float = 0.2
    """Probability that a sample is scaled."""
    intensity_scale: tuple[float, float] = (0.9, 1.1)
    """Range of the per-channel multiplicative intensity factor (applied to every sample when enabled)."""
    intensity_shift: float = 0.1
    """Maximum absolute per-channel additive shift, in units of the (z-scored) intensity."""
    gamma_range: tuple[float, float] = (0.7, 1.5)
    """Range of the gamma exponent applied to per-channel min-max rescaled intensities."""
    gamma_prob: float = 0.3
    """Probability that a sample gets a gamma transform."""
    noise_std: float = 0.1
    """Maximum standard deviation of additive Gaussian noise (drawn uniformly in [0, noise_std])."""
    noise_prob: float = 0.15
    """Probability that a sample gets Gaussian noise."""
    intensity_prob: float = 1.0
    """Probability that a sample gets the intensity scale/shift (per channel). With intensity_scale (0.75, 1.25),
    intensity_shift 0 and 0.15 this is nnU-Net's multiplicative brightness transform."""
    split_factor_ranges: bool = False
    """Draw the factors of intensity_scale, contrast_range and gamma_range as nnU-Net does: with probability 1/2
    uniformly from [low, 1), else from [1, high] (so (0.7, 1.5) lowers gamma as often as it raises it). False:
    uniformly over [low, high]."""
    blur_prob: float = 0.0
    """Probability that a sample gets a Gaussian blur (nnU-Net: 0.2)."""
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    """Range of the blur's standard deviation in voxels, drawn per channel and per spatial axis."""
    blur_channel_prob: float = 0.5
    """Probability that each channel of a blurred sample is blurred."""
    contrast_prob: float = 0.0
    """Probability that a sample gets a contrast change (nnU-Net: 0.15): per channel, intensities move away from
    (factor > 1) or towards the channel mean, then are clipped to the channel's previous range."""
    contrast_range: tuple[float, float] = (0.75, 1.25)
    """Range of the per-channel contrast factor."""
    lowres_prob: float = 0.0
    """Probability that a sample gets simulated low resolution (nnU-Net: 0.25): a channel is resampled to
    `zoom` x its size (nearest) and back ((bi/tri)linear), so its shape is kept and its detail is lost."""
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    """Range of the low-resolution zoom factor (one per channel, the same along every axis), within (0, 1]."""
    lowres_channel_prob: float = 0.5
    """Probability that each channel of a low-resolution sample is resampled."""
    gamma_invert_prob: float = 0.0
    """Probability that a sample gets an inverted gamma transform (nnU-Net: 0.1): gamma (exponent from
    gamma_range) of the negated intensities, negated back; applied before the plain gamma, drawn independently."""
    gamma_retain_stats: bool = False
    """Restore each channel's mean and standard deviation after a (plain or inverted) gamma transform
    (nnU-Net: true). False keeps the channel's minimum and maximum instead."""
    elastic_prob: float = 0.0
    """Probability that a sample gets a smooth elastic deformation (nnU-Net v2: 0, off), applied together with the
    rotation/scaling in the same resampling, image and label alike."""
    elastic_magnitude: tuple[float, float] = (0.0, 0.1)
    """Range of the largest displacement along each axis, as a fraction of the patch size along that axis, drawn
    per axis. With elastic_points 5 a magnitude <= 0.1 cannot fold the grid (neighbouring control points are a
    quarter of the patch apart)."""
    elastic_points: int = 5
    """Control points per axis of the displacement lattice (normal random values, scaled to the drawn magnitude,
    interpolated (bi/tri)linearly to the patch); fewer points = smoother deformation."""

    def validate(self, prefix: str = "data.augment") -> None:
        """Raise ValueError naming ``<prefix>.<field>`` for the first invalid field."""
        for name in ("enabled", "on_device"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{prefix}.{name}: expected true/false, got {getattr(self, name)!r}")
        if not _is_int_tuple(self.flip_axes) or any(a < 0 or a > 2 for a in self.flip_axes):
            raise ValueError(f"{prefix}.flip_axes: expected a list of axes in 0..2, got {self.flip_axes!r}")
        if not _is_num(self.rotate_deg) or not 0.0 <= self.rotate_deg <= 180.0:
            raise ValueError(f"{prefix}.rotate_deg: expected degrees in [0, 180], got {self.rotate_deg!r}")
        _prob(f"{prefix}.rotate_prob", self.rotate_prob)
        _range(f"{prefix}.scale_range", self.scale_range, 1e-3)
        _prob(f"{prefix}.scale_prob", self.scale_prob)
        _range(f"{prefix}.intensity_scale", self.intensity_scale, 0.0)
        if not _is_num(self.intensity_shift) or self.intensity_shift < 0:
            raise ValueError(f"{prefix}.intensity_shift: expected a number >= 0, got {self.intensity_shift!r}")
        _range(f"{prefix}.gamma_range", self.gamma_range, 1e-3)
        _prob(f"{prefix}.gamma_prob", self.gamma_prob)
        if not _is_num(self.noise_std) or self.noise_std < 0:
            raise ValueError(f"{prefix}.noise_std: expected a number >= 0, got {self.noise_std!r}")
        _prob(f"{prefix}.noise_prob", self.noise_prob)
        _prob(f"{prefix}.intensity_prob", self.intensity_prob)
        for name in ("split_factor_ranges", "gamma_retain_stats"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{prefix}.{name}: expected true/false, got {getattr(self, name)!r}")
        _prob(f"{prefix}.blur_prob", self.blur_prob)
        _range(f"{prefix}.blur_sigma", self.blur_sigma, 0.0, 5.0)
        _prob(f"{prefix}.blur_channel_prob", self.blur_channel_prob)
        _prob(f"{prefix}.contrast_prob", self.contrast_prob)
        _range(f"{prefix}.contrast_range", self.contrast_range, 0.0)
        _prob(f"{prefix}.lowres_prob", self.lowres_prob)
        _range(f"{prefix}.lowres_zoom", self.lowres_zoom, 0.05, 1.0)
        _prob(f"{prefix}.lowres_channel_prob", self.lowres_channel_prob)
        _prob(f"{prefix}.gamma_invert_prob", self.gamma_invert_prob)
        _prob(f"{prefix}.elastic_prob", self.elastic_prob)
        _range(f"{prefix}.elastic_magnitude", self.elastic_magnitude, 0.0, 0.5)
        if not isinstance(self.elastic_points, int) or isinstance(self.elastic_points, bool) or self.elastic_points < 2:
            raise ValueError(f"{prefix}.elastic_points: expected an int >= 2, got {self.elastic_points!r}")

    @classmethod
    def nnunet(cls, spatial_dims: int = 3) -> AugmentConfig:
        """nnU-Net v2's default training augmentation (`nnUNetTrainer.get_training_transforms`, isotropic data):
        the values in the class docstring; in-plane rotation up to 180 degrees for `spatial_dims` 2."""
        return cls(
            rotate_deg=30.0 if spatial_dims == 3 else 180.0,
            rotate_prob=0.2,
            scale_range=(0.7, 1.4),
            scale_prob=0.2,
            intensity_scale=(0.75, 1.25),
            intensity_shift=0.0,
            intensity_prob=0.15,
            split_factor_ranges=True,
            gamma_range=(0.7, 1.5),
            gamma_prob=0.3,
            gamma_invert_prob=0.1,
            gamma_retain_stats=True,
            noise_std=0.1,
            noise_prob=0.1,
            blur_prob=0.2,
            blur_sigma=(0.5, 1.0),
            blur_channel_prob=0.5,
            contrast_prob=0.15,
            contrast_range=(0.75, 1.25),
            lowres_prob=0.25,
            lowres_zoom=(0.5, 1.0),
            lowres_channel_prob=0.5,
            elastic_prob=0.0,
        )


@dataclass
class DataConfig:
    """Where training data comes from and how batches are drawn from it."""

    store: str = ""
    """Path to the `<name>.zarr` store written by `python -m preprocess`."""
    mode: str = "patch3d"
    """"patch3d" (random 3D patches), "slice2d" (axial slices from 3D stores) or "image2d" (Z=1 image stores)."""
    patch_size: tuple[int, ...] = (128, 128, 128)
    """Patch shape: (Z, Y, X) for patch3d; (Y, X) for slice2d / image2d."""
    batch_size: int = 2
    """Samples per rank per micro-step."""
    foreground_fraction: float = 0.33
    """Fraction of training samples placed on a voxel of a random present class (nnU-Net-style oversampling):
    round(batch_size * fraction) per batch, at least one when > 0 (batch 1: exactly this fraction of consecutive
    samples). See `distseg.data.sampling`."""
    foreground_cache_mb: int = 64
    """Memory bound (MiB) of each loader process's cache of foreground coordinates (int16; least recently used
    cases are dropped and re-read on demand)."""
    val_folds: tuple[int, ...] = (0,)
    """Folds held out for validation; training uses all other folds."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the training process)."""
    prefetch_factor: int = 2
    """Batches prefetched per worker."""
    target: str = "regions"
    """"regions" (one sigmoid target per store region, e.g. BraTS WT/TC/ET) or "binary" (label > 0)."""
    val_patch_size: tuple[int, ...] = ()
    """`train.val_mode: crop` only: the validation crop in stored voxels, centred on each case. Empty = patch3d:
    `patch_size` x `downsample` (one centred crop per case, the training field of view); slice2d / image2d: the
    largest in-plane size of the validation cases rounded up to a multiple of 16 x `downsample`, so every whole
    slice / image is validated (smaller ones zero-padded). With `downsample` f > 1 the crop is pooled by f for the
    model and its logits interpolated back, so the Dice is counted on the stored grid."""
    context_margin: int = 0
    """Extra voxels read on each side of a training patch (spatial dims only) so the device rotation/scaling/elastic
    resamples real data instead of zero padding; `DeviceAugment` crops it away, so the model always sees
    `patch_size`. With 0 the loader yields exactly `patch_size` and rotated corners are zero-filled. Patches are
    kept inside the case; the margin around them is not (it is zero-padded past the case border)."""
    downsample: int = 1
    """Train (and predict) at 1/f of the stored resolution: patches of `patch_size` cover f x the extent, read from the
    store and average-pooled (labels: each region's fraction > 0.5); prediction pools the case, runs the window at
    that resolution and interpolates the logits back (nnU-Net's "3d_lowres" idea). In-plane only for 2D modes.
    Measured on the real BraTS labels: f = 2 loses at most 3 % WT/TC and 8 % ET Dice through the round trip, and a
    CPU-budget model sees 8x the context per voxel computed."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Augmentation settings."""

    @property
    def spatial_dims(self) -> int:
        return 3 if self.mode == "patch3d" else 2

    def validate(self, prefix: str = "data") -> None:
        """Raise ValueError naming ``<prefix>.<field>`` for the first invalid field."""
        if not isinstance(self.store, str) or not self.store:
            raise ValueError(f"{prefix}.store: expected the path of a <name>.zarr store, got {self.store!r}")
        if self.mode not in MODES:
            raise ValueError(f"{prefix}.mode: expected one of {list(MODES)}, got {self.mode!r}")
        n = self.spatial_dims
        if not _is_int_tuple(self.patch_size, n) or any(p <= 0 for p in self.patch_size):
            raise ValueError(
                f"{prefix}.patch_size: expected {n} positive ints for mode={self.mode}, got {list(self.patch_size)}"
            )
        if self.val_patch_size and (
            not _is_int_tuple(self.val_patch_size, n) or any(p <= 0 for p in self.val_patch_size)
        ):
            raise ValueError(
                f"{prefix}.val_patch_size: expected {n} positive ints for mode={self.mode} (or empty), "
                f"got {list(self.val_patch_size)}"
            )
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"{prefix}.batch_size: expected an int >= 1, got {self.batch_size!r}")
        _prob(f"{prefix}.foreground_fraction", self.foreground_fraction)
        if not _is_int_tuple(self.val_folds) or any(f < 0 for f in self.val_folds):
            raise ValueError(f"{prefix}.val_folds: expected a list of fold numbers >= 0, got {self.val_folds!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"{prefix}.num_workers: expected an int >= 0, got {self.num_workers!r}")
        if not isinstance(self.prefetch_factor, int) or self.prefetch_factor < 1:
            raise ValueError(f"{prefix}.prefetch_factor: expected an int >= 1, got {self.prefetch_factor!r}")
        if self.target not in TARGETS:
            raise ValueError(f"{prefix}.target: expected one of {list(TARGETS)}, got {self.target!r}")
        if not isinstance(self.foreground_cache_mb, int) or self.foreground_cache_mb < 0:
            raise ValueError(
                f"{prefix}.foreground_cache_mb: expected an int >= 0 (MiB), got {self.foreground_cache_mb!r}"
            )
        if not isinstance(self.downsample, int) or isinstance(self.downsample, bool) or not 1 <= self.downsample <= 8:
            raise ValueError(f"{prefix}.downsample: expected an integer factor in 1..8, got {self.downsample!r}")
        if not isinstance(self.context_margin, int) or self.context_margin < 0:
            raise ValueError(f"{prefix}.context_margin: expected an int >= 0, got {self.context_margin!r}")
        self.augment.validate(f"{prefix}.augment")
