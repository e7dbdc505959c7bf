"""Connected-component postprocessing of region masks (chosen on validation, stored beside the model).

    pp = Postprocessing({"WT": RegionRule(keep_largest=True)})
    masks = postprocess(masks, {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}, pp, spacing=(1, 1, 1))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def nesting(regions: Mapping[str, Sequence[int]]) -> dict[int, list[int]]:
    """For each region index, the indices of the regions that contain it (BraTS: TC in WT, ET in TC and WT)."""
    sets = [set(int(v) for v in vals) for vals in regions.values()]
    return {k: [j for j, outer in enumerate(sets) if j != k and sets[k] < outer] for k in range(len(sets))}


@dataclass
class RegionRule:
    """Connected-component cleanup of one region's mask."""

    keep_largest: bool = False
    """Keep only the largest connected component."""
    min_volume: float = 0.0
    """Remove components smaller than this volume (mm^3 for NIfTI spacing; pixels for 2D); 0 = keep all."""

    def is_identity(self) -> bool:
        return not self.keep_largest and self.min_volume <= 0

    def describe(self) -> str:
        if self.keep_largest:
            return "keep largest component"
        return f"remove components < {self.min_volume:g}" if self.min_volume > 0 else "none"


@dataclass
class Postprocessing:
    """Per-region rules, applied in region order; a region nested in another is then clipped to it."""

    rules: dict[str, RegionRule] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, float | bool]]:
        return {name: {"keep_largest": r.keep_largest, "min_volume": r.min_volume} for name, r in self.rules.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Mapping[str, float | bool]]) -> Postprocessing:
        return cls({name: RegionRule(bool(r.get("keep_largest", False)), float(r.get("min_volume", 0.0)))
                    for name, r in d.items()})


def component_labels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components (full connectivity: diagonal neighbours join) -> (labels, sizes per label 1..n)."""
    from scipy import ndimage  # here, not at import: every training rank imports this module, few call this

    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labels, n = ndimage.label(mask, structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] if n else np.zeros(0, dtype=np.int64)
    return labels, sizes


def apply_rule(mask: np.ndarray, rule: RegionRule, spacing: Sequence[float] | None = None) -> np.ndarray:
    """One region's bool mask (*S) cleaned by `rule` (voxel volume from `spacing`, default 1)."""
    mask = np.asarray(mask, dtype=bool)
    if rule.is_identity() or not mask.any():
        return mask
    labels, sizes = component_labels(mask)
    if rule.keep_largest:
        return labels == (int(np.argmax(sizes)) + 1)
    voxel = float(np.prod(spacing)) if spacing is not None else 1.0
    keep = np.concatenate([[False], sizes * voxel >= rule.min_volume])
    return keep[labels]


def postprocess(masks: np.ndarray, regions: Mapping[str, Sequence[int]], pp: Postprocessing,
                spacing: Sequence[float] | None = None) -> np.ndarray:
    """bool (K, *S) region masks -> cleaned masks: each region's rule, then nested regions clipped to their
    containers (so a removed whole-tumour island takes its core and enhancing voxels with it)."""
    masks = np.asarray(masks, dtype=bool).copy()
    names = list(regions)
    for k, name in enumerate(names):
        rule = pp.rules.get(name)
        if rule is not None:
            masks[k] = apply_rule(masks[k], rule, spacing)
    return clip_to_containers(masks, regions)


def clip_to_containers(masks: np.ndarray, regions: Mapping[str, Sequence[int]]) -> np.ndarray:
    """bool (K, *S) region masks with every nested region clipped to its containers, in place (BraTS: TC to WT, ET
    to TC and WT): a voxel the whole-tumour channel calls background is not tumour core. Returns `masks`."""
    for k, outers in nesting(regions).items():
        for j in outers:
            masks[k] &= masks[j]
    return masks


def component_spacing(attrs: Mapping[str, Any]) -> Sequence[float] | None:
    """What component volumes are measured in for a stored case: its voxel spacing in mm (3D), pixels for 2D
    images (None: a voxel counts 1), as `min_volume` rules are chosen and applied."""
    return None if attrs.get("source_ndim") == 2 else attrs.get("spacing")
