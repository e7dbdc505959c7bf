"""Datasets over a `Store`: training batches (map-style, indexed by step) and deterministic validation samples.

A dataset carries the rank's open `Store` (`_StoreHandle`) into its DataLoader workers: its case index is parsed once
per rank; zarr handles are never shared across processes (the `Store` reopens them in each).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from distseg.data.augment import DeviceAugment, apply_flips
from distseg.data.resample import downsample_image, downsample_label
from distseg.data.sampling import TrainSampler, centred_start
from distseg.data.store import Store

logger = logging.getLogger(__name__)


class _StoreHandle:
    """The dataset's store: the parent's open `Store`, or a path opened lazily once per process.

    A `Store` handed in travels into every DataLoader worker with its parsed `index.json` (inherited on fork,
    pickled without its array handles on spawn), so the index is parsed once per rank, not once per worker; the
    `Store` itself drops zarr handles opened in another process (`Store._array`)."""

    def __init__(self, store: Store | str) -> None:
        self.path = str(store.path if isinstance(store, Store) else store)
        self._store = store if isinstance(store, Store) else None

    def get(self) -> Store:
        if self._store is None:
            self._store = Store.open(self.path)
            logger.debug("opened store %s in pid %d", self.path, os.getpid())
        return self._store


def crop_or_pad(image: np.ndarray, label: np.ndarray | None, start: tuple[int, ...], size: tuple[int, ...]):
    """Box of `size` at `start` over the trailing spatial dims of image (C, *D) / label (*D); zero outside."""
    out_img = np.zeros((image.shape[0], *size), dtype=image.dtype)
    out_lab = None if label is None else np.zeros(size, dtype=label.dtype)
    src, dst = [], []
    for s, n, d in zip(start, size, image.shape[1:], strict=True):
        lo, hi = max(s, 0), min(s + n, d)
        if hi <= lo:
            return out_img, out_lab
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out_img[(slice(None), *dst)] = image[(slice(None), *src)]
    if out_lab is not None:
        out_lab[tuple(dst)] = label[tuple(src)]
    return out_img, out_lab


class TrainBatches(torch.utils.data.Dataset):
    """Item `s` is training batch `s` of rank `rank` of `world_size`: global micro-batch ``m = stream_base + s *
    world_size + rank``, i.e. the samples at global positions ``m*B .. m*B+B-1`` of the `TrainSampler`.

    `stream_base` counts the global micro-batches drawn before this rank count took over (0 unless the run was
    resumed on another number of ranks, see `distseg.train.elastic`). Returns ``{"image": float32 (B, C, *P'), "label":
    uint8 (B, *P'), "case_id": list[str], "sample_index": int64 (B,) global positions, "foreground": bool (B,)}``
    where ``P' = patch + 2*margin`` (`P' = patch` when `worker_augment` is given: it resamples and crops here, on
    CPU).
    """

    def __init__(
        self,
        store: Store | str,
        sampler: TrainSampler,
        batch_size: int,
        worker_augment: DeviceAugment | None = None,
        rank: int = 0,
        world_size: int = 1,
        stream_base: int = 0,
        pooled_cache_bytes: int = 512 << 20,
    ) -> None:
        self.store = _StoreHandle(store)
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.worker_augment = worker_augment
        self.rank, self.world_size, self.stream_base = int(rank), int(world_size), int(stream_base)
        self.pooled_cache_bytes = int(pooled_cache_bytes)
        self._pooled: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pooled": OrderedDict()}  # each worker builds its own cache

    def _pooled_case(self, store: Store, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The whole case pooled by `data.downsample` (image float32 z-scored, label uint8), LRU-cached by bytes:
        pooling once per case and worker is far cheaper than reading and pooling f^3 x the patch every sample."""
        hit = self._pooled.get(case_id)
        if hit is not None:
            self._pooled.move_to_end(case_id)
            return hit
        image, label = store.read_case(case_id)
        if label is None:
            raise ValueError(f"{store.path}: training case {case_id!r} has no label")
        f, dims = self.sampler.downsample, self.sampler.spatial_dims
        pooled = (downsample_image(torch.from_numpy(image), f, dims).numpy(),
                  downsample_label(label, f, store.regions, dims))
        self._pooled[case_id] = pooled
        while len(self._pooled) > 1 and sum(a.nbytes + b.nbytes for a, b in self._pooled.values()) > \
                self.pooled_cache_bytes:
            self._pooled.popitem(last=False)
        return pooled

    def __len__(self) -> int:  # effectively infinite; the step sampler decides what is read
        return 2**62

    def first_position(self, step: int) -> int:
        """Global position of the first sample of this rank's batch `step`."""
        return (self.stream_base + int(step) * self.world_size + self.rank) * self.batch_size

    def sample(self, position: int) -> tuple[np.ndarray, np.ndarray, str, bool]:
        """The sample at global `position`: image float32 (C, *P'), label uint8 (*P') (flipped views, maybe
        non-contiguous), case id, whether foreground-centred."""
        store = self.store.get()
        plan = self.sampler.plan(store, position)
        if self.sampler.downsample > 1:
            image, label = crop_or_pad(*self._pooled_case(store, plan.case_id), plan.start, plan.size)
        else:
            image, label = store.read_patch(plan.case_id, plan.start, plan.size)
        if label is None:
            raise ValueError(f"{store.path}: training case {plan.case_id!r} has no label")
        if self.sampler.spatial_dims == 2:  # (C, 1, Y, X) box from one axial slice -> (C, Y, X)
            image, label = image[:, 0], label[0]
        image, label = apply_flips(image, label, plan.flips)  # views, copied once into the batch buffer
        return image, label, plan.case_id, plan.foreground

    def __getitem__(self, step: int) -> dict:
        first = self.first_position(step)
        image = label = None
        case_ids, fg = [], []
        for j in range(self.batch_size):
            img, lab, cid, is_fg = self.sample(first + j)
            if image is None:  # one preallocated batch buffer: flip + collate cost one copy, not two
                image = np.empty((self.batch_size, *img.shape), np.float32)
                label = np.empty((self.batch_size, *lab.shape), np.uint8)
            image[j], label[j] = img, lab
            case_ids.append(cid)
            fg.append(is_fg)
        index = torch.arange(first, first + self.batch_size, dtype=torch.int64)
        image_t, label_t = torch.from_numpy(image), torch.from_numpy(label)
        if self.worker_augment is not None:
            image_t, label_t = self.worker_augment(image_t, label_t, index)
        return {
            "image": image_t,
            "label": label_t,
            "case_id": case_ids,
            "sample_index": index,
            "foreground": torch.tensor(fg, dtype=torch.bool),
        }


@dataclass(frozen=True)
class ValSample:
    """One validation crop: box at `start` of `size` (z, y, x); `slice2d` boxes have Z size 1."""

    case_id: str
    start: tuple[int, int, int]
    size: tuple[int, int, int]


def validation_samples(store: Store, case_ids: list[str], mode: str, patch_size: tuple[int, ...]) -> list[ValSample]:
    """Deterministic crops of `case_ids`: patch3d one centred 3D crop per case; slice2d every axial slice (centred
    in-plane crop); image2d one centred crop of the (Z = 1) image. Crops larger than the case are zero-padded."""
    out: list[ValSample] = []
    for cid in case_ids:
        shape = store.case(cid).shape[1:]
        if mode == "patch3d":
            out.append(ValSample(cid, centred_start(shape, patch_size), tuple(patch_size)))  # type: ignore[arg-type]
            continue
        y0, x0 = centred_start(shape[1:], patch_size)
        zs = range(shape[0]) if mode == "slice2d" else [shape[0] // 2]
        out.extend(ValSample(cid, (z, y0, x0), (1, *patch_size)) for z in zs)  # type: ignore[arg-type]
    return out


class ValReader:
    """Reads `ValSample`s; keeps the last whole case in memory so consecutive slices of one case read it once."""

    def __init__(self, store: Store, spatial_dims: int) -> None:
        self.store = store
        self.spatial_dims = spatial_dims
        self._cached: tuple[str, np.ndarray, np.ndarray | None] | None = None

    def read(self, s: ValSample) -> tuple[np.ndarray, np.ndarray]:
        """image float32 (C, *P), label uint8 (*P) (zeros for unlabelled cases, which validation never lists)."""
        if self.spatial_dims == 3:
            image, label = self.store.read_patch(s.case_id, s.start, s.size)
        else:
            if self._cached is None or self._cached[0] != s.case_id:
                self._cached = (s.case_id, *self.store.read_case(s.case_id))
            _, whole_img, whole_lab = self._cached
            image, label = crop_or_pad(whole_img, whole_lab, s.start, s.size)
            image, label = image[:, 0], None if label is None else label[0]
        if label is None:
            label = np.zeros(image.shape[1:], dtype=np.uint8)
        return image, label
