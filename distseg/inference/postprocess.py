"""Connected-component postprocessing of region masks (chosen on validation, stored beside the model).

    pp = Postprocessing({"WT": RegionRule(keep_largest=True)})
    masks = postprocess(masks, {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}, pp, spacing=(1, 1, 1))

A rule acts on one case ("case" scope) or on a subject's 2D slices stacked in slice order ("subject" scope: 2D slice
datasets such as LGG, where a patient is a volume cut into images). Keeping the largest component per slice keeps a
lone false positive on a slice without tumour; over the stacked slices it is removed (LGG out-of-fold per-patient
Dice 0.731 -> 0.753, .notes/crossval.md). A 3D case is its own stack, so both scopes act alike on it.

Each rule also carries its region's probability threshold (`binarise`; 0.5 unless one was chosen out of fold): a
model that overcalls a region (BraTS tumour core out of fold: Dice 0.50 at 0.5, 0.65 at 0.7) is decided at its own
operating point before any component is cleaned.

    stacks = group_by_stack(case_ids, lambda c: stack_place(c, attrs[c]))
    cleaned = postprocess_stack([masks[c] for c in stack], [stack_place(c, attrs[c]).position for c in stack], ...)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

logger = logging.getLogger(__name__)


def nesting(regions: Mapping[str, Sequence[int]]) -> dict[int, list[int]]:
    """For each region index, the indices of the regions that contain it (BraTS: TC in WT, ET in TC and WT)."""
    sets = [set(int(v) for v in vals) for vals in regions.values()]
    return {k: [j for j, outer in enumerate(sets) if j != k and sets[k] < outer] for k in range(len(sets))}


DEFAULT_THRESHOLD = 0.5
"""sigmoid(logit) > 0.5: the decision the model was trained for, unless a threshold was chosen out of fold."""


@dataclass
class RegionRule:
    """Connected-component cleanup of one region's mask."""

    keep_largest: bool = False
    """Keep only the largest connected component."""
    min_volume: float = 0.0
    """Remove components smaller than this volume (mm^3 for NIfTI spacing; pixels for 2D); 0 = keep all."""
    scope: str = "case"
    """"case": the components of one case; "subject": those of a subject's 2D slices stacked in slice order
    (components join across neighbouring slices; see the module doc). A 3D case is its own stack."""
    threshold: float = DEFAULT_THRESHOLD
    """A voxel belongs to the region when its probability is above this (chosen out of fold; see `binarise`)."""

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"postprocessing rule scope {self.scope!r}; expected one of {', '.join(SCOPES)}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"postprocessing threshold {self.threshold}; expected a probability in (0, 1)")

    def is_identity(self) -> bool:
        """No component cleanup (the threshold is applied by `binarise`, before any rule)."""
        return not self.keep_largest and self.min_volume <= 0

    def describe(self) -> str:
        if self.keep_largest:
            text = "keep largest component"
        elif self.min_volume > 0:
            text = f"remove components < {self.min_volume:g}"
        else:
            text = "none"
        if text != "none" and self.scope == "subject":
            text += " (a subject's slices stacked)"
        if self.threshold != DEFAULT_THRESHOLD:
            text = f"threshold {self.threshold:g}" + ("" if text == "none" else f", {text}")
        return text


SCOPES = ("case", "subject")


@dataclass
class Postprocessing:
    """Per-region rules, applied in region order; a region nested in another is then clipped to it."""

    rules: dict[str, RegionRule] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, float | bool | str]]:
        return {name: {"keep_largest": r.keep_largest, "min_volume": r.min_volume, "scope": r.scope,
                       "threshold": r.threshold} for name, r in self.rules.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Mapping[str, float | bool | str]]) -> Postprocessing:
        """Rules as `to_dict` writes them; files written before scopes and thresholds existed are "case" rules
        at threshold 0.5."""
        return cls({name: RegionRule(bool(r.get("keep_largest", False)), float(r.get("min_volume", 0.0)),
                                     str(r.get("scope", "case")), float(r.get("threshold", DEFAULT_THRESHOLD)))
                    for name, r in d.items()})

    def thresholds(self, regions: Iterable[str]) -> np.ndarray:
        """float64 (K,) probability threshold of each region in `regions` order (0.5 where no rule sets one)."""
        return np.array([self.rules[n].threshold if n in self.rules else DEFAULT_THRESHOLD for n in regions],
                        dtype=np.float64)

    def has_subject_rules(self) -> bool:
        """Whether a rule needs a subject's slices together (prediction then groups them: `group_by_stack`)."""
        return any(r.scope == "subject" and not r.is_identity() for r in self.rules.values())


def component_labels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components (full connectivity: diagonal neighbours join) -> (labels, sizes per label 1..n)."""
    from scipy import ndimage  # here, not at import: every training rank imports this module, few call this

    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labels, n = ndimage.label(mask, structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] if n else np.zeros(0, dtype=np.int64)
    return labels, sizes


def apply_with_labels(labels: np.ndarray, sizes: np.ndarray, rule: RegionRule, voxel: float = 1.0) -> np.ndarray:
    """A mask's connected components (`component_labels`) cleaned by `rule`; `voxel`: one voxel's volume."""
    if rule.is_identity() or sizes.size == 0:
        return labels > 0
    if rule.keep_largest:
        return labels == (int(np.argmax(sizes)) + 1)
    keep = np.concatenate([[False], sizes * voxel >= rule.min_volume])
    return keep[labels]


def apply_rule(mask: np.ndarray, rule: RegionRule, spacing: Sequence[float] | None = None) -> np.ndarray:
    """One region's bool mask (*S) cleaned by `rule` (voxel volume from `spacing`, default 1), as one case."""
    mask = np.asarray(mask, dtype=bool)
    if rule.is_identity() or not mask.any():
        return mask
    return apply_with_labels(*component_labels(mask), rule, voxel_volume(spacing))


def voxel_volume(spacing: Sequence[float] | None) -> float:
    return float(np.prod(spacing)) if spacing is not None else 1.0


def postprocess(masks: np.ndarray, regions: Mapping[str, Sequence[int]], pp: Postprocessing,
                spacing: Sequence[float] | None = None) -> np.ndarray:
    """bool (K, *S) region masks of one case -> cleaned masks: each region's rule, then nested regions clipped to
    their containers (so a removed whole-tumour island takes its core and enhancing voxels with it)."""
    return postprocess_stack([masks], [None], regions, pp, spacing)[0]


# ------------------------------------------------------------------------------------------------ stacks
@dataclass(frozen=True)
class StackPlace:
    """Which stack a case is postprocessed in by "subject" rules, and where along Z."""

    key: Hashable
    position: int | None
    """The slice's position in its subject's volume (2D slices); None: the case is a stack of its own."""


def stack_place(case_id: str, attrs: Mapping[str, Any]) -> StackPlace:
    """A 2D slice with a subject and a slice position goes into its subject's stack; any other case (3D volumes, 2D
    images without a patient or position) is its own stack. `attrs`: a stored case's attributes (or the same keys:
    ``source_ndim``, ``subject``, ``slice_index``)."""
    subject, index = attrs.get("subject"), attrs.get("slice_index")
    if attrs.get("source_ndim") == 2 and subject and index is not None:
        return StackPlace(("subject", str(subject)), int(index))
    return StackPlace(("case", case_id), None)


T = TypeVar("T")


def group_by_stack(items: Iterable[T], place: Callable[[T], StackPlace],
                   name: Callable[[T], str] = str) -> list[list[T]]:
    """`items` grouped by their stack, in order of first appearance (a case of its own is a group of one).

    A subject whose slices clash (two at one position: e.g. two scans of one patient that a subject pattern put
    under one subject) cannot be stacked: its slices become stacks of their own, with a warning naming the clash
    (`name`: an item's case id), so its "subject" rules act per slice instead of failing the run."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(place(item).key, []).append(item)
    out: list[list[T]] = []
    for key, group in groups.items():
        seen: dict[int, T] = {}
        clash = None
        for item in group:
            q = place(item).position
            if q is not None and q in seen:
                clash = (seen[q], item, q)
                break
            if q is not None:
                seen[q] = item
        if clash is None:
            out.append(group)
            continue
        a, b, q = clash
        logger.warning("%s and %s are both slice %d of %s: its %d slices are postprocessed one by one (subject "
                       "rules need one slice per position)", name(a), name(b), q, key[-1], len(group))
        out.extend([item] for item in group)
    return out


def _stacked(parts: Sequence[np.ndarray], positions: Sequence[int], what: str) -> tuple[np.ndarray, list[int]]:
    """bool (Z_i, Y, X) parts -> (Z, Y, X) volume with part i at Z offset positions[i] - min (missing slices stay
    empty, so components never join across a gap), and the offsets."""
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"{what}: slices of one subject have different sizes {sorted(shapes)}; stacking them for "
                         "subject postprocessing needs one in-plane size")
    offsets = [int(q) - min(positions) for q in positions]
    depth = max(o + p.shape[0] for o, p in zip(offsets, parts, strict=True))
    vol = np.zeros((depth, *parts[0].shape[1:]), dtype=bool)
    seen = np.zeros(depth, dtype=bool)
    for o, p in zip(offsets, parts, strict=True):
        if seen[o:o + p.shape[0]].any():
            raise ValueError(f"{what}: two slices at position {o + min(positions)}; expected one slice per position "
                             "(`group_by_stack` splits such subjects)")
        seen[o:o + p.shape[0]] = True
        vol[o:o + p.shape[0]] = p
    return vol, offsets


def rule_variants(parts: Sequence[np.ndarray], positions: Sequence[int | None], rules: Sequence[RegionRule],
                  spacing: Sequence[float] | None = None, what: str = "stack") -> list[list[np.ndarray]]:
    """One region's bool masks of a stack's cases (each (Z, Y, X)) under each of `rules` -> [rule][case] masks.

    Components are computed once per scope (per case; over the stacked cases) however many rules are tried: the
    postprocessing search scores every candidate from them."""
    parts = [np.asarray(p, dtype=bool) for p in parts]
    voxel = voxel_volume(spacing)
    per_case: list[tuple[np.ndarray, np.ndarray]] | None = None
    stacked: tuple[np.ndarray, np.ndarray, list[int]] | None = None
    out: list[list[np.ndarray]] = []
    for rule in rules:
        if rule.is_identity():
            out.append(parts)
        elif rule.scope == "subject" and len(parts) > 1:
            if any(q is None for q in positions):
                raise ValueError(f"{what}: a subject rule needs every slice's position")
            if stacked is None:
                vol, offsets = _stacked(parts, [int(q) for q in positions if q is not None], what)
                stacked = (*component_labels(vol), offsets)
            labels, sizes, offsets = stacked
            kept = apply_with_labels(labels, sizes, rule, voxel)
            out.append([kept[o:o + p.shape[0]] for o, p in zip(offsets, parts, strict=True)])
        else:
            if per_case is None:
                per_case = [component_labels(p) for p in parts]
            out.append([apply_with_labels(lab, sz, rule, voxel) for lab, sz in per_case])
    return out


def postprocess_stack(masks: Sequence[np.ndarray], positions: Sequence[int | None],
                      regions: Mapping[str, Sequence[int]], pp: Postprocessing,
                      spacing: Sequence[float] | None = None, what: str = "stack") -> list[np.ndarray]:
    """The bool (K, Z, Y, X) region masks of one stack's cases (`group_by_stack`; positions from `stack_place`) ->
    cleaned copies: in region order, each region first clipped to its containers as cleaned so far (the tumour core
    keeps only what lies in the whole tumour that survived its rule), then its rule ("case" rules on each case,
    "subject" rules over the cases stacked); last, nested regions clipped to their containers. A rule therefore never
    picks a piece of a region that its container's rule removed (BraTS: keep-largest on TC choosing a core inside a
    discarded whole-tumour island would leave no core at all). One case alone is `postprocess`."""
    out = [np.asarray(m, dtype=bool).copy() for m in masks]
    outers = nesting(regions)
    for k, name in enumerate(regions):
        for m in out:
            for j in outers[k]:
                m[k] &= m[j]
        rule = pp.rules.get(name)
        if rule is None or rule.is_identity():
            continue
        cleaned = rule_variants([m[k] for m in out], positions, [rule], spacing, what)[0]
        for m, c in zip(out, cleaned, strict=True):
            m[k] = c
    for m in out:
        clip_to_containers(m, regions)
    return out


def binarise(probabilities: np.ndarray, regions: Mapping[str, Sequence[int]],
             pp: Postprocessing | None = None) -> np.ndarray:
    """Probabilities float (K, *S) -> bool region masks (K, *S): each region above its threshold (`pp`'s, 0.5 by
    default), then nested regions clipped to their containers. The one thresholding of prediction, evaluation and
    the choices."""
    t = (pp or Postprocessing()).thresholds(regions)
    probabilities = np.asarray(probabilities)
    return clip_to_containers(probabilities > t.reshape(-1, *([1] * (probabilities.ndim - 1))), regions)


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
