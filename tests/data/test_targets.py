"""Canonical labels -> region / binary targets."""

from __future__ import annotations

import pytest
import torch

from distseg.data.labels import BINARY_REGIONS, BRATS_REGIONS
from distseg.data.targets import labels_to_targets, num_targets, target_names


def test_brats_regions_from_canonical_labels() -> None:
    label = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=torch.uint8).view(2, 1, 4)  # (B, *S) = (2, 1, 4)
    t = labels_to_targets(label, "regions", BRATS_REGIONS)
    assert t.shape == (2, 3, 1, 4) and t.dtype == torch.float32
    assert target_names("regions", BRATS_REGIONS) == ["WT", "TC", "ET"]
    # per label value: WT = {1,2,3}, TC = {1,3}, ET = {3}
    expected = {0: (0, 0, 0), 1: (1, 1, 0), 2: (1, 0, 0), 3: (1, 1, 1)}
    for b in range(2):
        for i in range(4):
            v = int(label[b, 0, i])
            assert tuple(t[b, :, 0, i].tolist()) == expected[v], f"label {v}"


def test_binary_and_single_region() -> None:
    label = torch.tensor([[[0, 1], [1, 0]]], dtype=torch.uint8)  # (1, 2, 2)
    assert torch.equal(labels_to_targets(label, "binary", BRATS_REGIONS), label.unsqueeze(1).float())
    assert torch.equal(labels_to_targets(label, "regions", BINARY_REGIONS), label.unsqueeze(1).float())
    assert num_targets("binary", BRATS_REGIONS) == 1 and num_targets("regions", BRATS_REGIONS) == 3


def test_binary_target_counts_every_tumour_class() -> None:
    label = torch.tensor([[0, 1, 2, 3]], dtype=torch.uint8)
    assert labels_to_targets(label, "binary", BRATS_REGIONS).flatten().tolist() == [0, 1, 1, 1]


def test_unknown_target() -> None:
    with pytest.raises(ValueError, match="data.target"):
        labels_to_targets(torch.zeros(1, 2, dtype=torch.uint8), "softmax", BRATS_REGIONS)
