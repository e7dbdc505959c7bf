"""Training sampler / loader and validation iterator over real tiny Zarr stores."""

from __future__ import annotations

import itertools
import os
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from distseg.data import store as store_mod
from distseg.data.config import AugmentConfig, DataConfig
from distseg.data.datasets import TrainBatches
from distseg.data.index import write_index
from distseg.data.loader import build_device_augment, build_train_loader, build_val_iterator
from distseg.data.sampling import TrainSampler
from distseg.data.store import Store


def _cfg(store: Path, **kw) -> DataConfig:
    base = {"store": str(store), "patch_size": (8, 8, 8), "batch_size": 2, "num_workers": 0, "val_folds": (0,)}
    return DataConfig(**{**base, **kw})


def _take(loader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


def _same(a: dict, b: dict) -> bool:
    return (
        torch.equal(a["image"], b["image"])
        and torch.equal(a["label"], b["label"])
        and a["case_id"] == b["case_id"]
        and torch.equal(a["sample_index"], b["sample_index"])
    )


def test_foreground_oversampling_is_forced_per_batch(brats_store: Path) -> None:
    """nnU-Net: round(B * p) foreground samples in EVERY batch (at least one for p > 0, B >= 2); B = 1 keeps the
    fraction p over any run of consecutive samples. A pure function of (seed, rank, sample index)."""
    store = Store.open(brats_store)
    cases = store.case_ids(exclude_folds=[0])
    for batch, p, per_batch in [(2, 0.33, 1), (2, 0.2, 1), (4, 0.33, 1), (5, 0.5, 3), (3, 1.0, 3), (4, 0.0, 0)]:
        sampler = TrainSampler(cases, (8, 8, 8), p, (), seed=11, batch_size=batch)
        for step in range(50):
            flags = [sampler.is_foreground(step * batch + j) for j in range(batch)]
            assert sum(flags) == per_batch, (batch, p, step, flags)
    for p in (0.33, 0.5, 0.1):
        sampler = TrainSampler(cases, (8, 8, 8), p, (), seed=3, batch_size=1)
        flags = [sampler.is_foreground(i) for i in range(400)]
        for window in (10, 37, 100):  # any consecutive run holds the fraction to within one sample
            counts = [sum(flags[i : i + window]) for i in range(len(flags) - window)]
            assert all(abs(c - p * window) < 1 + 1e-9 for c in counts), (p, window, min(counts), max(counts))
    # pure function of the index: order of calls and a fresh sampler do not matter
    a = TrainSampler(cases, (8, 8, 8), 0.33, (), seed=5, batch_size=1)
    b = TrainSampler(cases, (8, 8, 8), 0.33, (), seed=5, batch_size=1)
    assert [a.plan(store, i) for i in range(30)] == [b.plan(store, i) for i in reversed(range(30))][::-1]


def test_foreground_samples_contain_their_class(brats_store: Path) -> None:
    store = Store.open(brats_store)
    cases = store.case_ids(exclude_folds=[0])
    sampler = TrainSampler(cases, (8, 8, 8), 1.0, (), seed=11, batch_size=2)
    random_ = TrainSampler(cases, (8, 8, 8), 0.0, (), seed=11, batch_size=2)
    fg_ds, rnd_ds = TrainBatches(str(brats_store), sampler, 2), TrainBatches(str(brats_store), random_, 2)
    with_fg = sum(bool(fg_ds.sample(i)[1].any()) for i in range(100))
    assert all(fg_ds.sample(i)[3] for i in range(20))
    assert with_fg == 100  # the chosen voxel stays inside the (clamped) patch
    assert sum(bool(rnd_ds.sample(i)[1].any()) for i in range(100)) < 60


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_patches_stay_inside_the_case_and_reach_its_borders(brats_store: Path, fraction: float) -> None:
    """Where the case is at least as long as the patch, the patch lies inside it (random starts uniform over all
    valid starts, foreground patches clamped); where it is shorter, the case is centred and only that axis padded."""
    store = Store.open(brats_store)
    cid = "case01"  # stored (4, 22, 28, 31)
    shape = store.case(cid).shape[1:]
    patch = (8, 30, 16)  # Y is longer than the case: padded along Y only
    sampler = TrainSampler([cid], patch, fraction, (), seed=0, batch_size=1)
    ds = TrainBatches(str(brats_store), sampler, batch_size=1)
    image, label = store.read_case(cid)
    starts = {0: set(), 2: set()}
    for i in range(300):
        plan = sampler.plan(store, i)
        assert plan.size == patch
        z, y, x = plan.start
        assert 0 <= z <= shape[0] - patch[0] and 0 <= x <= shape[2] - patch[2], plan
        assert y == (shape[1] - patch[1]) // 2  # the short axis: centred, padded on both sides
        starts[0].add(z)
        starts[2].add(x)
        if i < 20:  # the read patch is the case's own voxels, zero only in the Y padding
            img, lab, _, _ = ds.sample(i)
            inner = slice(-y, -y + shape[1])
            np.testing.assert_array_equal(img[:, :, inner], image[:, z : z + 8, :, x : x + 16])
            np.testing.assert_array_equal(lab[:, inner], label[z : z + 8, :, x : x + 16])
            assert not img[:, :, : -y].any() and not img[:, :, -y + shape[1] :].any()
    if fraction == 0.0:  # uniform over valid starts: both extremes (the case borders) are reached
        assert starts[0] == set(range(shape[0] - patch[0] + 1))
        assert {0, shape[2] - patch[2]} <= starts[2]


def test_context_margin_surrounds_the_bounded_patch(brats_store: Path) -> None:
    """The margin is read around the in-case patch (zero past the border) and cropped away by the augmentation."""
    store = Store.open(brats_store)
    sampler = TrainSampler(["case01"], (8, 8, 8), 0.0, (), seed=0, margin=3, batch_size=1)
    shape = store.case("case01").shape[1:]
    seen_border = False
    for i in range(100):
        plan = sampler.plan(store, i)
        assert plan.size == (14, 14, 14)
        inner = [s + 3 for s in plan.start]
        assert all(0 <= s <= d - 8 for s, d in zip(inner, shape, strict=True))
        seen_border |= min(inner) == 0
    assert seen_border


@pytest.mark.parametrize("mode", ["image2d", "slice2d"])
def test_a_2d_patch_the_size_of_the_image_is_exactly_the_image(brats_store: Path, image_store: Path,
                                                                 mode: str) -> None:
    path, cid = (image_store, "img02") if mode == "image2d" else (brats_store, "case03")
    store = Store.open(path)
    shape = store.case(cid).shape[1:]  # (Z, Y, X)
    image, label = store.read_case(cid)
    for fraction in (0.0, 1.0):
        sampler = TrainSampler([cid], shape[1:], fraction, (), seed=1, batch_size=1)
        ds = TrainBatches(str(path), sampler, batch_size=1)
        for i in range(10):
            z = sampler.plan(store, i).start[0]
            img, lab, _, _ = ds.sample(i)
            np.testing.assert_array_equal(img, image[:, z])
            np.testing.assert_array_equal(lab, label[z])


def test_foreground_cache_keeps_int16_within_its_bound(brats_store: Path) -> None:
    store = Store.open(brats_store)
    cases = store.case_ids()
    per_case = {c: sum(store.foreground(c, k).shape[0] * 6 for k in (1, 2, 3)) for c in cases}
    bound = sum(sorted(per_case.values())[-2:])  # room for about two cases
    sampler = TrainSampler(cases, (8, 8, 8), 1.0, (), seed=0, batch_size=1,
                           fg_cache_bytes=bound)
    for i in range(3 * len(cases)):
        sampler.plan(store, i)
        cache = sampler._fg_cache
        assert cache.nbytes <= bound and cache.nbytes == sum(a.nbytes for v in cache._items.values() for a in v)
        assert all(a.dtype == np.int16 for v in cache._items.values() for a in v)
    assert 1 <= len(sampler._fg_cache) < len(cases)
    # evicted cases are re-read on demand and give the same plans
    fresh = TrainSampler(cases, (8, 8, 8), 1.0, (), seed=0, batch_size=1)
    assert [sampler.plan(store, i) for i in range(20)] == [fresh.plan(store, i) for i in range(20)]


def test_same_seed_rank_step_same_batch_and_ranks_differ(brats_store: Path) -> None:
    cfg = _cfg(brats_store)
    a = _take(build_train_loader(cfg, rank=0, world_size=2, seed=5), 4)
    b = _take(build_train_loader(cfg, rank=0, world_size=2, seed=5), 4)
    other = _take(build_train_loader(cfg, rank=1, world_size=2, seed=5), 4)
    other_seed = _take(build_train_loader(cfg, rank=0, world_size=2, seed=6), 4)
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    assert not any(torch.equal(x["image"], y["image"]) for x, y in zip(a, other, strict=True))
    assert not any(torch.equal(x["image"], y["image"]) for x, y in zip(a, other_seed, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_uninterrupted_run(brats_store: Path, workers: int) -> None:
    cfg = _cfg(brats_store, num_workers=workers, context_margin=2)
    full = _take(build_train_loader(cfg, rank=1, world_size=2, seed=3), 7)
    resumed_loader = build_train_loader(cfg, rank=1, world_size=2, seed=3, start_step=4)
    resumed = _take(resumed_loader, 3)
    assert all(_same(x, y) for x, y in zip(full[4:], resumed, strict=True))
    assert resumed_loader.state_dict() == {"next_step": 7}
    # the device augmentation of the resumed batches matches too (draws keyed by sample index)
    aug = build_device_augment(cfg, seed=3)
    for x, y in zip(full[4:], resumed, strict=True):
        xa, ya = aug(x["image"], x["label"], x["sample_index"]), aug(y["image"], y["label"], y["sample_index"])
        assert torch.equal(xa[0], ya[0]) and torch.equal(xa[1], ya[1])


def test_load_state_dict_resumes(brats_store: Path) -> None:
    cfg = _cfg(brats_store)
    full = _take(build_train_loader(cfg, 0, 1, seed=1), 5)
    loader = build_train_loader(cfg, 0, 1, seed=1)
    loader.load_state_dict({"next_step": 3})
    assert all(_same(x, y) for x, y in zip(full[3:], _take(loader, 2), strict=True))


def test_global_shuffle_shards_each_epoch(brats_store: Path) -> None:
    """Over one epoch (n_train samples across all ranks) every training case is drawn exactly once."""
    store = Store.open(brats_store)
    cases = store.case_ids(exclude_folds=[0])
    sampler = TrainSampler(cases, (8, 8, 8), 0.33, (), seed=2)
    for world in (1, 2, 4):
        for epoch in range(2):
            drawn = []
            for r in range(world):
                ds = TrainBatches(str(brats_store), sampler, batch_size=1, rank=r, world_size=world)
                drawn += [
                    sampler.case_for(ds.first_position(s)) for s in range(len(cases) * 3)
                    if epoch * len(cases) <= ds.first_position(s) < (epoch + 1) * len(cases)
                ]
            assert sorted(drawn) == sorted(cases)


def test_the_stream_is_the_same_on_any_rank_count(brats_store: Path) -> None:
    """Global micro-batch m holds the same samples whichever rank of however many ranks draws it, and a rank count
    taking over at `stream_base` continues the stream where the previous one stopped (elastic resume)."""
    cfg = _cfg(brats_store)
    one = _take(build_train_loader(cfg, rank=0, world_size=1, seed=4), 6)  # micro-batches 0..5
    two = [_take(build_train_loader(cfg, rank=r, world_size=2, seed=4), 3) for r in range(2)]
    assert all(_same(one[2 * s + r], two[r][s]) for s in range(3) for r in range(2))
    # 2 ranks drew 2 batches each (micro-batches 0..3); 3 ranks continue at micro-batch 4
    three = [_take(build_train_loader(cfg, rank=r, world_size=3, seed=4, stream_base=4), 1)[0] for r in range(3)]
    assert _same(three[0], one[4]) and _same(three[1], one[5])
    assert three[2]["sample_index"].tolist() == [12, 13]


def test_the_index_is_parsed_once_per_rank_not_per_worker(brats_store: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The rank's open Store (its parsed index.json) travels into its workers: no worker parses it again."""
    log = tmp_path / "parses.txt"
    real_load = store_mod.load_index

    def recording_load(path):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real_load(path)

    indexed = tmp_path / "indexed.zarr"
    shutil.copytree(brats_store, indexed)
    assert write_index(indexed) > 0
    monkeypatch.setattr(store_mod, "load_index", recording_load)  # inherited by forked workers
    loader = build_train_loader(_cfg(indexed, num_workers=2), 0, 1, seed=0)
    it = iter(loader)
    got = [next(it) for _ in range(6)]
    reference = [loader.dataset[s] for s in range(6)]  # after the fork: OpenMP used before a fork can hang it
    assert all(_same(a, b) for a, b in zip(got, reference, strict=True))
    assert loader._loader is not None and loader._loader.persistent_workers
    assert [int(p) for p in log.read_text().split()] == [os.getpid()]  # the parent's one parse; workers none
    # spawned workers receive the dataset pickled: the parsed index comes along, zarr handles do not
    clone = pickle.loads(pickle.dumps(loader.dataset))
    assert clone.store.get()._indexed and not clone.store.get()._arrays
    assert _same(clone[0], reference[0])
    assert [int(p) for p in log.read_text().split()] == [os.getpid()]


def test_open_array_handles_are_bounded(brats_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod.Store, "MAX_OPEN_ARRAYS", 3)
    store = store_mod.Store.open(brats_store)
    cases = store.case_ids()
    for cid in cases:
        store.read_patch(cid, (0, 0, 0), (4, 4, 4))  # image + label: two handles per case
    assert list(store._arrays) == [(cases[-2], "label"), (cases[-1], "image"), (cases[-1], "label")]


@pytest.mark.parametrize("mode", ["patch3d", "slice2d"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_sharding_covers_all_without_duplicates(brats_store: Path, mode: str, world: int) -> None:
    patch = (8, 8, 8) if mode == "patch3d" else (16, 16)
    cfg = _cfg(brats_store, mode=mode, patch_size=patch, val_folds=(0, 1), batch_size=3)
    store = Store.open(brats_store)
    val_cases = store.case_ids(folds=[0, 1])
    expected = Counter(
        {c: (store.case(c).shape[1] if mode == "slice2d" else 1) for c in val_cases}
    )
    seen: Counter = Counter()
    boxes = set()
    n_batches = []
    for r in range(world):
        batches = list(build_val_iterator(cfg, r, world))
        n_batches.append(len(batches))
        for b in batches:
            v = patch if mode == "patch3d" else (32, 32)  # default: whole slices (28 x <=32), rounded up to 16s
            assert b["image"].shape == (3, 4, *v) and b["label"].shape == (3, *v)
            for cid, valid, start in zip(b["case_id"], b["valid"].tolist(), b["start"].tolist(), strict=True):
                if valid:
                    seen[cid] += 1
                    boxes.add((cid, *start))
    assert seen == expected
    assert len(boxes) == sum(expected.values())  # no (case, crop) pair twice
    assert len(set(n_batches)) == 1  # every rank runs the same number of (collective) forwards
    # deterministic
    assert all(torch.equal(x["image"], y["image"]) for x, y in
               zip(build_val_iterator(cfg, 0, world), build_val_iterator(cfg, 0, world), strict=True))


def test_slice2d_training_oversamples_tumour_slices(brats_store: Path) -> None:
    cfg = _cfg(brats_store, mode="slice2d", patch_size=(12, 12), foreground_fraction=1.0,
               augment=AugmentConfig(enabled=False), batch_size=4)
    for batch in _take(build_train_loader(cfg, 0, 1, seed=0), 5):
        assert batch["image"].shape == (4, 4, 12, 12) and batch["foreground"].all()
        assert batch["label"][:, 6, 6].gt(0).all()


@pytest.mark.parametrize("val_size", [(42, 30), ()])
def test_image2d_pads_small_images_and_validates_whole_images(image_store: Path, val_size: tuple) -> None:
    cfg = DataConfig(store=str(image_store), mode="image2d", patch_size=(40, 40), val_patch_size=val_size,
                     val_folds=(1,), num_workers=0, target="binary", batch_size=2)
    batch = _take(build_train_loader(cfg, 0, 1, seed=0), 1)[0]
    assert batch["image"].shape == (2, 1, 40, 40) and batch["label"].dtype == torch.uint8
    store = Store.open(image_store)
    batches = list(build_val_iterator(cfg, 0, 1))
    # default: the largest validation image (39 x 29) rounded up to multiples of 16
    assert batches[0]["image"].shape[2:] == (val_size or (48, 32))
    got = {}
    for b in batches:
        for i, cid in enumerate(b["case_id"]):
            if b["valid"][i]:
                got[cid] = int(b["label"][i].sum())
    # the validation crop covers every image fully, so every labelled voxel is seen
    assert got == {c: int(store.read_case(c)[1].sum()) for c in store.case_ids(folds=[1])}
