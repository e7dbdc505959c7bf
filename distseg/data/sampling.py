"""Where each training sample comes from: a pure function of (seed, global sample position).

The run draws one global stream of samples at positions ``p = 0, 1, 2, ...``; micro-batches are consecutive
blocks of B positions (global micro-batch ``m`` holds ``m*B .. m*B+B-1``), and the ranks deal the micro-batches
among themselves (`distseg.data.datasets.TrainBatches`: batch `s` of rank `r` of `W` is global micro-batch
``base + s*W + r``). Sample `p` is drawn as:

* case: a global shuffle. Position `p` falls in epoch ``p // n_cases``, whose permutation is drawn from
  ``(seed, epoch)``; every case is seen once per epoch over all ranks, and no two ranks draw the same position.
* position: with probability `foreground_fraction` the patch is centred on a stored foreground voxel of a random
  class present in the case (nnU-Net-style oversampling); otherwise its centre is uniform over the volume, so
  patches may overhang the border (the store zero-pads).
* flips: each configured spatial axis flipped with probability 1/2.

Nothing depends on the rank, worker ids or on what was drawn before, so resuming at batch `s` replays exactly the
batches an uninterrupted run would have seen, for any number of loader workers; and an optimizer step (``accum *
W`` consecutive micro-batches) holds the same samples, grouped into the same micro-batches, for every rank count
with the same global batch: a run resumed on another number of ranks continues the same stream (`distseg.elastic`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distseg.data.store import Store

# Seed-sequence keys are always [seed, stream, a, b]: fixed length, because SeedSequence ignores trailing zeros
# ([s, 1] and [s, 1, 0] give the same stream), and a stream tag keeps the uses independent.
STREAM_SAMPLE = 1
STREAM_DEVICE_AUG = 2
STREAM_EPOCH = 3


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
    foreground: bool  # centred on a foreground voxel


class TrainSampler:
    """Deterministic plans for global sample positions over the training cases of a store.

    `spatial_dims` is 3 (patch (Z, Y, X) read as is) or 2 (patch (Y, X) read as a (1, Y, X) box from one axial
    slice: slices of 3D cases, or the single slice of a Z = 1 image case). `margin` voxels of context are added on
    each side of the in-plane / spatial dims (never along Z for 2D).
    """

    def __init__(
        self,
        case_ids: list[str],
        patch_size: tuple[int, ...],
        foreground_fraction: float,
        flip_axes: tuple[int, ...],
        seed: int,
        margin: int = 0,
    ) -> None:
        if not case_ids:
            raise ValueError("TrainSampler: no training cases (check data.store and data.val_folds)")
        self.case_ids = list(case_ids)
        self.spatial_dims = len(patch_size)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.foreground_fraction = float(foreground_fraction)
        self.flip_axes = tuple(a for a in flip_axes if a < self.spatial_dims)
        self.seed, self.margin = int(seed), int(margin)
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None
        self._fg_cache: dict[str, list[np.ndarray]] = {}

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
        """Stored foreground coordinates (N, 3) of each class present in the case (cached per process)."""
        fg = self._fg_cache.get(case_id)
        if fg is None:
            classes = sorted(int(k) for k in store.attrs["label_values"] if int(k) != 0)
            fg = [c for c in (store.foreground(case_id, k) for k in classes) if len(c)]
            self._fg_cache[case_id] = fg
        return fg

    def plan(self, store: Store, position: int) -> SamplePlan:
        """The plan for the sample at global `position`; reads only cached case metadata from `store`."""
        case_id = self.case_for(position)
        rng = sample_rng(self.seed, STREAM_SAMPLE, position)
        want_fg = rng.random() < self.foreground_fraction
        shape = store.case(case_id).shape[1:]  # (Z, Y, X)
        fg = self._foreground(store, case_id) if want_fg else []
        if fg:
            coords = fg[int(rng.integers(len(fg)))]  # a random *present* class, then a random voxel of it
            centre = tuple(int(v) for v in coords[int(rng.integers(len(coords)))])
        else:
            centre = tuple(int(rng.integers(d)) for d in shape)
        if self.spatial_dims == 3:
            size = tuple(p + 2 * self.margin for p in self.patch_size)
            start = tuple(c - p // 2 - self.margin for c, p in zip(centre, self.patch_size, strict=True))
        else:
            py, px = self.patch_size
            size = (1, py + 2 * self.margin, px + 2 * self.margin)
            start = (centre[0], centre[1] - py // 2 - self.margin, centre[2] - px // 2 - self.margin)
        flips = tuple(a for a in self.flip_axes if rng.random() < 0.5)
        return SamplePlan(case_id, start, size, flips, bool(fg))  # type: ignore[arg-type]


def centred_start(shape: tuple[int, ...], size: tuple[int, ...]) -> tuple[int, ...]:
    """Start of a box of `size` centred on a volume of `shape` (negative when the box is larger: padded)."""
    return tuple((d - s) // 2 for d, s in zip(shape, size, strict=True))
