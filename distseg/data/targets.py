"""Canonical label maps -> training targets (one sigmoid channel per region), on any device.

BraTS regions (store attr ``regions``): WT = {1, 2, 3} (whole tumour), TC = {1, 3} (tumour core), ET = {3}
(enhancing). 2D stores have one region, ``tumour`` = {1}. ``target="binary"`` is one channel, label > 0.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def num_targets(target: str, regions: Mapping[str, Sequence[int]]) -> int:
    """Output channels the model needs for `target`."""
    if target == "binary":
        return 1
    if target == "regions":
        return len(regions)
    raise ValueError(f"data.target: expected 'regions' or 'binary', got {target!r}")


def target_names(target: str, regions: Mapping[str, Sequence[int]]) -> list[str]:
    """Channel names in the order `labels_to_targets` produces them (e.g. ["WT", "TC", "ET"])."""
    num_targets(target, regions)  # raises for an unknown target
    return ["foreground"] if target == "binary" else list(regions)


def labels_to_targets(label: torch.Tensor, target: str, regions: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """label integer (B, *S) canonical values -> float32 (B, K, *S) of {0, 1}, on label's device.

    "regions": channel k is 1 where the label is in the k-th region's values (store order, e.g. WT, TC, ET);
    "binary": one channel, label > 0.
    """
    if target == "binary":
        return (label > 0).unsqueeze(1).float()
    num_targets(target, regions)  # raises for an unknown target
    if not regions:
        raise ValueError("labels_to_targets: the store defines no regions; use data.target=binary")
    lut = region_table(tuple((k, tuple(int(v) for v in vs)) for k, vs in regions.items()), label.device)
    # Values above every region (none in a valid store) clamp onto the table's all-zero last row, so no host sync
    # is needed to check them.
    out = lut[label.long().clamp(0, lut.shape[0] - 1)]  # (B, *S, K)
    return out.movedim(-1, 1).contiguous()


@functools.lru_cache(maxsize=32)
def region_table(regions: tuple[tuple[str, tuple[int, ...]], ...], device: torch.device) -> torch.Tensor:
    """float32 (max value + 2, K) lookup table, row v = the K region bits of label value v (last row all zero).

    One gather replaces K `isin`s. Built on the host and copied to `device` once per (regions, device): building
    it on the device every step cost a host-to-device copy per region."""
    max_value = max(max(values) for _, values in regions)
    lut = torch.zeros(max_value + 2, len(regions), dtype=torch.float32)
    for k, (_, values) in enumerate(regions):
        lut[list(values), k] = 1.0
    return lut.to(device)


def region_paint_values(regions: Mapping[str, Sequence[int]]) -> list[int]:
    """The canonical label each region channel paints when channels are painted in order (later ones on top).

    Region k paints the one label that is in region k but in no later region: BraTS WT {1,2,3}, TC {1,3}, ET {3}
    -> [2, 1, 3] (edema, then necrosis, then enhancing on top), as nnU-Net's `regions_class_order`. Raises
    ValueError when the regions are not decodable that way.
    """
    values = [set(int(v) for v in vals) for vals in regions.values()]
    out = []
    for k, own in enumerate(values):
        later = set().union(*values[k + 1 :]) if k + 1 < len(values) else set()
        rest = own - later
        if len(rest) != 1:
            raise ValueError(f"regions {dict(regions)}: region {list(regions)[k]!r} must have exactly one label not in "
                             f"the regions after it (has {sorted(rest)}); order regions from largest to smallest")
        out.append(rest.pop())
    return out


def regions_to_labels(masks: np.ndarray | torch.Tensor, regions: Mapping[str, Sequence[int]]) -> np.ndarray:
    """Region masks bool (K, *S) -> canonical labels uint8 (*S): region k paints `region_paint_values(...)[k]`."""
    masks = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if masks.shape[0] != len(regions):
        raise ValueError(f"regions_to_labels: {masks.shape[0]} mask channels for regions {list(regions)}")
    label = np.zeros(masks.shape[1:], dtype=np.uint8)
    for value, mask in zip(region_paint_values(regions), masks, strict=True):
        label[mask.astype(bool)] = value
    return label
