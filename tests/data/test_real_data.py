"""The loader on the real BraTS 2018 samples (skipped when ../shared/data is absent)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import torch

from distseg.data.config import DataConfig
from distseg.data.loader import build_device_augment, build_train_loader, build_val_iterator
from distseg.data.store import Store
from distseg.data.targets import labels_to_targets


def test_real_patches_targets_and_validation(real_brats_store: Path) -> None:
    store = Store.open(real_brats_store)
    folds = sorted({store.case(c).fold for c in store.case_ids()})
    cfg = DataConfig(store=str(real_brats_store), patch_size=(32, 32, 32), batch_size=3, foreground_fraction=0.5,
                     val_folds=(folds[0],), num_workers=0, context_margin=4)
    aug = build_device_augment(cfg, seed=0)
    fg_hits = 0
    for batch in itertools.islice(build_train_loader(cfg, 0, 1, seed=0), 4):
        assert batch["image"].shape == (3, 4, 40, 40, 40)
        image, label = aug(batch["image"], batch["label"], batch["sample_index"])
        assert image.shape == (3, 4, 32, 32, 32) and torch.isfinite(image).all()
        targets = labels_to_targets(label, "regions", store.regions)
        # the region hierarchy ET within TC within WT holds voxel-wise after augmentation
        assert (targets[:, 2] <= targets[:, 1]).all() and (targets[:, 1] <= targets[:, 0]).all()
        for i in range(3):
            if batch["foreground"][i]:  # centred on a tumour voxel: index 20 of the 40-crop, 19 where flipped
                assert batch["label"][i][19:21, 19:21, 19:21].any()
                fg_hits += 1
    assert fg_hits > 0
    n_val = len(store.case_ids(folds=[folds[0]]))
    slices = sum(store.case(c).shape[1] for c in store.case_ids(folds=[folds[0]]))
    val = list(build_val_iterator(replace(cfg, mode="slice2d", patch_size=(64, 64)), 0, 1))
    assert sum(int(b["valid"].sum()) for b in val) == slices and n_val >= 1
