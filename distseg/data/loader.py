"""What the trainer calls: the training loader, the validation iterator and the batch augmentation.

Typical step (all ranks)::

    loader = build_train_loader(cfg.data, rank, world_size, seed, start_step)   # batch s = step s
    augment = build_device_augment(cfg.data, seed)
    for batch in loader:
        image, label = augment(batch["image"].to(dev), batch["label"].to(dev), batch["sample_index"])
        target = labels_to_targets(label, cfg.data.target, store.regions)     # (B, K, *patch) float

Resume: pass the number of loader batches this rank already consumed as `start_step` (or keep `TrainLoaderState`
in the checkpoint's client state); batch `s` depends only on (seed, rank, world size, stream base, s). On another
number of ranks, `stream_base` (global micro-batches drawn before) continues the same global sample stream.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator

import numpy as np
import torch

from distseg.core.signals import ignore_stop_signals
from distseg.data.augment import DeviceAugment
from distseg.data.config import DataConfig
from distseg.data.datasets import TrainBatches, ValReader, validation_samples
from distseg.data.location import is_remote
from distseg.data.sampling import TrainSampler
from distseg.data.store import Store

logger = logging.getLogger(__name__)


def open_store(cfg: DataConfig, prefix: str = "data") -> Store:
    """Validate `cfg`, open its store and check that the mode fits the store (errors name the key)."""
    cfg.validate(prefix)
    store = Store.open(cfg.store)
    if cfg.mode in ("patch3d", "slice2d") and store.kind != "brats3d":
        raise ValueError(f"{prefix}.mode: {cfg.mode} needs a 3D store, but {cfg.store} has kind {store.kind!r}")
    if cfg.mode == "image2d" and store.kind != "images2d":
        raise ValueError(f"{prefix}.mode: image2d needs a 2D image store, but {cfg.store} has kind {store.kind!r}")
    return store


def _train_val_cases(store: Store, cfg: DataConfig) -> tuple[list[str], list[str]]:
    train = store.case_ids(exclude_folds=cfg.val_folds, labelled_only=True)
    val = store.case_ids(folds=cfg.val_folds, labelled_only=True)
    if not train:
        raise ValueError(f"data.val_folds: {list(cfg.val_folds)} leaves no labelled training case in {cfg.store}")
    return train, val


def worker_init(worker_id: int) -> None:
    """One decompression/compute thread per loader worker: parallelism comes from the workers themselves. Stop
    signals are ignored: the rank finishes its step and shuts its workers down (`distseg.train.preemption`)."""
    ignore_stop_signals()
    torch.set_num_threads(1)
    try:
        import zarr
        from numcodecs import blosc

        zarr.config.set({"threading.max_workers": 1, "async.concurrency": 1})
        blosc.set_nthreads(1)
        blosc.use_threads = False
    except ImportError:  # zarr/numcodecs are hard dependencies; keep the worker alive if an API moves
        logger.warning("loader worker %d: could not limit zarr/blosc threads", worker_id)


class _StepSampler(torch.utils.data.Sampler[int]):
    """Yields step indices start, start+1, ... forever (map-style indices into `TrainBatches`)."""

    def __init__(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class TrainLoader:
    """Infinite iterable of training batches of one rank, starting at `start_step`.

    Iterating yields batch dicts (see `TrainBatches`) in step order regardless of `num_workers`; `state_dict()`
    gives the next step to read for a checkpoint's client state.
    """

    def __init__(self, dataset: TrainBatches, cfg: DataConfig, start_step: int) -> None:
        self.dataset = dataset
        self.cfg = cfg
        self.next_step = int(start_step)
        self._loader: torch.utils.data.DataLoader | None = None

    def _build(self) -> torch.utils.data.DataLoader:
        workers = self.cfg.num_workers
        kwargs: dict = {}
        if workers > 0:
            kwargs = {"prefetch_factor": self.cfg.prefetch_factor, "persistent_workers": True}
            if is_remote(self.cfg.store):
                # obstore's I/O runtime does not survive fork: workers start fresh (the dataset, with the parsed
                # index, is pickled into them) and open their own S3 client.
                kwargs["multiprocessing_context"] = "spawn"
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,  # the dataset builds whole batches
            sampler=_StepSampler(self.next_step),
            num_workers=workers,
            worker_init_fn=worker_init if workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    def __iter__(self) -> Iterator[dict]:
        self._loader = self._build()
        try:
            for batch in self._loader:
                self.next_step += 1
                yield batch
        finally:  # closing the generator drops the DataLoader, whose (persistent) workers then shut down
            self._loader = None

    def state_dict(self) -> dict[str, int]:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Takes effect at the next `iter()`."""
        self.next_step = int(state["next_step"])


def _margin(cfg: DataConfig) -> int:
    return cfg.context_margin if cfg.augment.enabled else 0


def build_train_loader(
    cfg: DataConfig, rank: int, world_size: int, seed: int, start_step: int = 0, stream_base: int = 0
) -> TrainLoader:
    """Training batches of `rank`: ``{"image": float32 (B, C, *P'), "label": uint8 (B, *P'), "case_id": list[str],
    "sample_index": int64 (B,) global sample positions, "foreground": bool (B,)}`` with ``P' = patch_size +
    2*context_margin`` when augmenting on the device (`build_device_augment` crops it to `patch_size`), else ``P' =
    patch_size``. Batch `s` is global micro-batch ``stream_base + s*world_size + rank`` (see `TrainBatches`)."""
    store = open_store(cfg)
    train_cases, _ = _train_val_cases(store, cfg)
    margin = _margin(cfg)
    sampler = TrainSampler(
        train_cases,
        tuple(cfg.patch_size),
        cfg.foreground_fraction,
        tuple(cfg.augment.flip_axes) if cfg.augment.enabled else (),
        seed,
        margin,
        batch_size=cfg.batch_size,
        fg_cache_bytes=cfg.foreground_cache_mb << 20,
        downsample=cfg.downsample,
    )
    worker_aug = None
    if cfg.augment.enabled and not cfg.augment.on_device:
        worker_aug = DeviceAugment(cfg.augment, cfg.patch_size, margin, seed)
    logger.info(
        "train loader rank %d/%d: %d cases, mode %s, patch %s (+%d margin), start step %d, stream base %d",
        rank, world_size, len(train_cases), cfg.mode, tuple(cfg.patch_size), margin, start_step, stream_base,
    )
    batches = TrainBatches(store, sampler, cfg.batch_size, worker_aug, rank, world_size, stream_base)
    return TrainLoader(batches, cfg, start_step)


def build_device_augment(cfg: DataConfig, seed: int) -> DeviceAugment:
    """The batch transform the trainer applies to every training batch on its device: rotation/scaling +
    intensity augmentation and the margin crop; a no-op when augmentation ran in the workers or is disabled."""
    if cfg.augment.enabled and cfg.augment.on_device:
        return DeviceAugment(cfg.augment, cfg.patch_size, _margin(cfg), seed)
    return DeviceAugment(cfg.augment, cfg.patch_size, 0, seed, enabled=False)


def val_patch_size(cfg: DataConfig, store: Store, val_cases: list[str]) -> tuple[int, ...]:
    """The validation crop in stored voxels: `val_patch_size` if set; else the training patch's field of view,
    `patch_size` x `downsample` (patch3d), or the largest in-plane size of the validation cases rounded up to a
    multiple of 16 x `downsample` (slice2d / image2d: whole slices / images), so the crop pooled by
    `data.downsample` is what the model trained on. Computed from metadata only, so every rank gets the same
    shape."""
    if cfg.val_patch_size:
        return tuple(cfg.val_patch_size)
    if cfg.mode == "patch3d":
        return tuple(p * cfg.downsample for p in cfg.patch_size)
    multiple = 16 * cfg.downsample
    shapes = np.array([store.case(c).shape[2:] for c in val_cases])
    return tuple(int(-(-v // multiple) * multiple) for v in shapes.max(axis=0))


def build_val_iterator(cfg: DataConfig, rank: int, world_size: int) -> Iterator[dict]:
    """Deterministic validation batches of `rank`, cases sharded across ranks without duplication.

    Yields ``{"image": float32 (B, C, *V), "label": uint8 (B, *V), "case_id": list[str], "valid": bool (B,),
    "start": int64 (B, 3)}`` (V = `val_patch_size(...)`; `start` is the crop's (z, y, x) in the stored
    case, negative where the crop is padded). Every rank yields the SAME number of batches (ZeRO-3 forwards are
    collective), so ranks with fewer samples pad with zero samples marked ``valid=False`` and case_id ""; the
    trainer must drop those from its tp/fp/fn sums before the all-reduce.
    """
    store = open_store(cfg)
    _, val_cases = _train_val_cases(store, cfg)
    if not val_cases:
        raise ValueError(f"data.val_folds: no labelled case of {cfg.store} is in folds {list(cfg.val_folds)}")
    size = val_patch_size(cfg, store, val_cases)
    per_rank = [validation_samples(store, val_cases[r::world_size], cfg.mode, size) for r in range(world_size)]
    n_batches = max(math.ceil(len(s) / cfg.batch_size) for s in per_rank)
    return _val_batches(store, per_rank[rank], n_batches, cfg.batch_size, size, cfg.spatial_dims)


def _val_batches(
    store: Store, samples: list, n_batches: int, batch_size: int, size: tuple[int, ...], spatial_dims: int
) -> Iterator[dict]:
    reader = ValReader(store, spatial_dims)
    shape = (len(store.channels), *size)
    for b in range(n_batches):
        chunk = samples[b * batch_size : (b + 1) * batch_size]
        read = [reader.read(s) for s in chunk]
        pad = batch_size - len(chunk)
        img = np.stack([r[0] for r in read] + [np.zeros(shape, np.float32)] * pad)
        lab = np.stack([r[1] for r in read] + [np.zeros(shape[1:], np.uint8)] * pad)
        yield {
            "image": torch.from_numpy(img),
            "label": torch.from_numpy(lab),
            "case_id": [s.case_id for s in chunk] + [""] * pad,
            "valid": torch.tensor([True] * len(chunk) + [False] * pad),
            "start": torch.tensor([s.start for s in chunk] + [(0, 0, 0)] * pad, dtype=torch.int64).view(-1, 3),
        }
