"""Where each training sample comes from: a pure function of (seed, global sample position).

The run draws one global stream of samples at positions ``p = 0, 1, 2, ...``; micro-batches are consecutive
blocks of B positions (global micro-batch ``m`` holds ``m*B .. m*B+B-1``), and the ranks deal the micro-batches
among themselves (`distseg.data.datasets.TrainBatches`: batch `s` of rank `r` of `W` is global micro-batch
``base + s*W + r``). Sample `p` is drawn as:

* case: a global shuffle. Position `p` falls in epoch ``p // n_cases``, whose permutation is drawn from
  ``(seed, epoch)``; every case is seen once per epoch over all ranks, and no two ranks draw the same position.
* foreground or not (nnU-Net-style oversampling, forced per micro-batch): with batch size B >= 2, the last
  ``n = round(B * foreground_fraction)`` samples of every micro-batch (``p % B >= B - n``; at least one when the
  fraction is > 0) are foreground samples; with B = 1, position p is one when
  ``floor((p + 1) * f + phase) > floor(p * f + phase)`` (phase drawn from the seed), so any run of consecutive
  samples holds the fraction f to within one sample. A foreground sample centres its patch on a stored voxel of a
  random class present in the case (a case with no foreground falls back to a random patch).
* position (as nnU-Net bounds it): along every axis where the case is at least as long as the patch, the patch
  lies inside the case: random patches start uniformly over all valid starts ``[0, D - P]``, foreground patches
  are centred on their voxel and then clamped into that range (the voxel stays inside). Along an axis where the
  case is shorter than the patch, the case is centred in the patch and only that axis is zero-padded. 2D samples
  take a uniform slice index and bound Y and X alike, so a 256x256 patch of a 256x256 image is the whole image.
* context margin (`data.context_margin`): extra voxels read around the bounded patch for the device rotation /
  scaling to resample from. The bound applies to the patch the model sees, not to the margin: a margin reaching
  past the case border is zero-padded, which only shows in rotated corners. (Bounding patch + margin instead would
  keep the patch `margin` voxels away from every border, so border tissue would be seen less often.)
* flips: each configured spatial axis flipped with probability 1/2.

Nothing depends on the rank, worker ids or on what was drawn before, so resuming at batch `s` replays exactly the
batches an uninterrupted run would have seen, for any number of loader workers; and an optimizer step (``accum *
W`` consecutive micro-batches) holds the same samples, grouped into the same micro-batches, for every rank count
with the same global batch: a run resumed on another number of ranks continues the same stream
(`distseg.train.elastic`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from distseg.data.resample import pooled_shape
from distseg.data.store import Store

# Seed-sequence keys are always [seed, stream, a, b]: fixed length, because SeedSequence ignores trailing zeros
# ([s, 1] and [s, 1, 0] give the same stream), and a stream tag keeps the uses independent.
STREAM_SAMPLE = 1
STREAM_DEVICE_AUG = 2
STREAM_EPOCH = 3
STREAM_PHASE = 4


def sample_rng(seed: int, stream: int, position: int) -> np.random.Generator:
    """The generator for the draws of the sample at global `position` in one stream (independent of everything
    else in the run). The key keeps the fixed [seed, stream, 0, position] layout of the epoch permutations."""
    return np.random.default_rng([int(seed), int(stream), 0, int(position)])


@dataclass(frozen=True)
class SamplePlan:
    """What to read for one sample. `start`/`size` are (z, y, x) in the stored frame, context margin included."""

    case_id: str
    start: tuple[int, int, int]
    size: tuple[int, int, int]
    flips: tuple[int, ...]  # spatial axes of the sample (0-based over the patch dims) to flip
    foreground: bool  # placed on a foreground voxel (which lies inside the patch)


class TrainSampler:
    """Deterministic plans for global sample positions over the training cases of a store.

    `spatial_dims` is 3 (patch (Z, Y, X) read as is) or 2 (patch (Y, X) read as a (1, Y, X) box from one axial
    slice: slices of 3D cases, or the single slice of a Z = 1 image case). `margin` voxels of context are added on
    each side of the in-plane / spatial dims (never along Z for 2D). With `downsample` f > 1 plans are in the pooled
    frame (case shape and foreground voxels divided by f; see distseg.data.resample). `batch_size` fixes which sample
    indices are
    foreground samples (see the module docstring). Foreground coordinates are cached per process as the store's
    int16, least recently used cases evicted beyond `fg_cache_bytes`.
    """

    def __init__(
        self,
        case_ids: list[str],
        patch_size: tuple[int, ...],
        foreground_fraction: float,
        flip_axes: tuple[int, ...],
        seed: int,
        margin: int = 0,
        batch_size: int = 1,
        fg_cache_bytes: int = 64 << 20,
        downsample: int = 1,
    ) -> None:
        if not case_ids:
            raise ValueError("TrainSampler: no training cases (check data.store and data.val_folds)")
        self.case_ids = list(case_ids)
        self.spatial_dims = len(patch_size)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.foreground_fraction = float(foreground_fraction)
        self.flip_axes = tuple(a for a in flip_axes if a < self.spatial_dims)
        self.seed, self.margin = int(seed), int(margin)
        self.batch_size = int(batch_size)
        self.downsample = int(downsample)
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None
        self._fg_cache = ForegroundCache(fg_cache_bytes)
        # B >= 2: the last n of every micro-batch; B = 1: a per-seed phase spreads them evenly over positions.
        p = self.foreground_fraction
        n = math.floor(self.batch_size * p + 0.5)
        self._fg_per_batch = min(self.batch_size, max(1, n) if p > 0 else 0)
        self._phase = float(np.random.default_rng([self.seed, STREAM_PHASE, 0, 0]).random())

    def is_foreground(self, position: int) -> bool:
        """Whether the sample at global `position` is a (forced) foreground sample: a pure function of (seed,
        position); micro-batches are aligned blocks of B positions, so each holds its forced share."""
        if self.batch_size >= 2:
            return position % self.batch_size >= self.batch_size - self._fg_per_batch
        p = self.foreground_fraction
        return math.floor((position + 1) * p + self._phase) > math.floor(position * p + self._phase)

    def case_for(self, position: int) -> str:
        """The case of the sample at global `position` (one permutation of the cases per epoch)."""
        g = int(position)
        n = len(self.case_ids)
        epoch = g // n
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, STREAM_EPOCH, 0, epoch]).permutation(n)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self.case_ids[int(self._perm[g % n])]

    def _foreground(self, store: Store, case_id: str) -> list[np.ndarray]:
        """Stored foreground coordinates (N, 3) int16 of each class present in the case (LRU-cached per process)."""
        fg = self._fg_cache.get(case_id)
        if fg is None:
            classes = sorted(int(k) for k in store.attrs["label_values"] if int(k) != 0)
            fg = [c for c in (store.foreground(case_id, k, dtype=np.int16) for k in classes) if len(c)]
            self._fg_cache.put(case_id, fg)
        return fg

    def plan(self, store: Store, position: int) -> SamplePlan:
        """The plan for the sample at global `position`; reads only cached case metadata from `store`."""
        case_id = self.case_for(position)
        rng = sample_rng(self.seed, STREAM_SAMPLE, position)
        shape = store.case(case_id).shape[1:]  # (Z, Y, X)
        f = self.downsample
        if f > 1:  # plan in the pooled frame (data.downsample): shape and foreground voxels divided by f
            shape = pooled_shape(shape, f, self.spatial_dims)
        fg = self._foreground(store, case_id) if self.is_foreground(position) else []
        if self.spatial_dims == 3:
            patch = self.patch_size
            margin = (self.margin,) * 3
        else:  # one axial slice: a (1, Y, X) box, no margin along Z
            patch = (1, *self.patch_size)
            margin = (0, self.margin, self.margin)
        if fg:
            coords = fg[int(rng.integers(len(fg)))]  # a random *present* class, then a random voxel of it
            centre = [int(v) for v in coords[int(rng.integers(len(coords)))]]
            if f > 1:
                centre = [c if (axis == 0 and self.spatial_dims == 2) else c // f for axis, c in enumerate(centre)]
            start = [clamp_start(c - p // 2, d, p) for c, d, p in zip(centre, shape, patch, strict=True)]
        else:
            start = [random_start(rng, d, p) for d, p in zip(shape, patch, strict=True)]
        flips = tuple(a for a in self.flip_axes if rng.random() < 0.5)
        start_m = tuple(s - m for s, m in zip(start, margin, strict=True))
        size = tuple(p + 2 * m for p, m in zip(patch, margin, strict=True))
        return SamplePlan(case_id, start_m, size, flips, bool(fg))  # type: ignore[arg-type]


def clamp_start(start: int, dim: int, patch: int) -> int:
    """A patch start moved into ``[0, dim - patch]`` (the patch inside the case); centred when `dim` < `patch`."""
    if dim < patch:
        return (dim - patch) // 2
    return min(max(start, 0), dim - patch)


def random_start(rng: np.random.Generator, dim: int, patch: int) -> int:
    """A start uniform over the valid starts ``[0, dim - patch]``; centred (padded) when `dim` < `patch`."""
    if dim < patch:
        return (dim - patch) // 2
    return int(rng.integers(dim - patch + 1))


class ForegroundCache:
    """Per-process LRU of foreground coordinate arrays, bounded by their bytes (the store's int16, 6 B/voxel).

    A loader worker visits every training case; the bound keeps its memory flat however many cases the store
    holds (a case re-read after eviction costs one small array read)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._items: OrderedDict[str, list[np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> list[np.ndarray] | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: str, arrays: list[np.ndarray]) -> None:
        size = sum(a.nbytes for a in arrays)
        if key in self._items:
            self.nbytes -= sum(a.nbytes for a in self._items.pop(key))
        self._items[key] = arrays
        self.nbytes += size
        while self.nbytes > self.max_bytes and len(self._items) > 1:  # the newest entry always stays
            _, old = self._items.popitem(last=False)
            self.nbytes -= sum(a.nbytes for a in old)


def centred_start(shape: tuple[int, ...], size: tuple[int, ...]) -> tuple[int, ...]:
    """Start of a box of `size` centred on a volume of `shape` (negative when the box is larger: padded)."""
    return tuple((d - s) // 2 for d, s in zip(shape, size, strict=True))
