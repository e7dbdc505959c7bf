"""Choosing the postprocessing (per-region thresholds, connected components) on validation (out-of-fold) predictions,
and the per-subject Dice the choices are made on.

    cache = ProbabilityCache(out_dir / PROBABILITIES_DIR)            # stored-frame probabilities, one file per case
    pp, table = choose_postprocessing(cache, store_truth(store), case_ids, regions)
    write_postprocessing(out_dir / POSTPROCESSING_FILE, pp, table, {"store": ..., "cases": case_ids})

Postprocessing is chosen as nnU-Net's `find_best_configuration` does: per region in order, try "keep the largest
component" and "remove components below V" and keep a rule only if the mean Dice over regions rises and no region's
mean Dice drops; on 2D slice stores each candidate is also tried over a patient's stacked slices ("subject" scope,
`distseg.inference.postprocess`). Dice is per subject (`SubjectDice`). `distseg.evaluation.model` calls it on a
run's validation cases, `distseg.evaluation.crossval` on pooled out-of-fold predictions, `distseg.evaluation.choose`
for the winning configuration.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from distseg.core.fileio import atomic_write, inside
from distseg.data.store import Store
from distseg.inference.postprocess import (
    Postprocessing,
    RegionRule,
    binarise,
    clip_to_containers,
    component_spacing,
    group_by_stack,
    postprocess_stack,
    rule_variants,
    stack_place,
)
from distseg.metrics import dice_from_counts, mask_counts

logger = logging.getLogger(__name__)

MIN_VOLUME_CANDIDATES = (10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0)
"""Component-size thresholds tried per region (mm^3 in 3D, pixels in 2D)."""
THRESHOLD_CANDIDATES = (0.4, 0.5, 0.6, 0.7)
"""Probability thresholds tried per region (0.5, the default, is the one to beat). A wider set (0.3-0.8) fitted the
choosing cases better but generalised worse: chosen on two folds of the BraTS CV and scored on the third, mean Dice
over regions 0.609 with 0.3-0.8 (WT 0.8 chosen, WT fell to 0.729), 0.633 with 0.4-0.7, 0.590 without thresholds
(.notes/crossval.md)."""
PROBABILITIES_DIR = "probabilities"


class ProbabilityCache:
    """Stored-frame sigmoid probabilities of predicted cases, one compressed float16 file per case:
    ``<folder>/<case_id>.npz`` with ``probabilities`` (K, Z, Y, X). What the choices read back one case at a time
    (postprocessing; ensembles of configurations average them)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, case_id: str) -> Path:
        return inside(self.folder, f"{case_id}.npz")

    def put(self, case_id: str, probabilities: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        data = np.asarray(probabilities, dtype=np.float16)
        atomic_write(self.path(case_id), lambda tmp: np.savez_compressed(tmp, probabilities=data))

    def get(self, case_id: str) -> np.ndarray:
        """float32 (K, Z, Y, X)."""
        with np.load(self.path(case_id)) as f:
            return f["probabilities"].astype(np.float32)

    def has(self, case_id: str) -> bool:
        return self.path(case_id).is_file()

    def discard(self, case_id: str) -> None:
        """Forget a case (it failed to predict this time): an older run's file must not stand in for it."""
        self.path(case_id).unlink(missing_ok=True)


class SubjectDice:
    """Mean Dice over subjects of several candidates (rules or configurations), accumulated one case at a time.

    A subject's cases are stacked: their confusion counts are summed per candidate and region, Dice is taken per
    subject (BraTS convention: both empty -> 1), then averaged over subjects; this is the per-subject table's Dice
    (`distseg.evaluation.scoring`) and the per-patient figure users report for 2D slice datasets (LGG). Where every
    case is its own subject (3D stores, 2D images without a patient) it is the mean Dice over cases. Choosing on
    the per-slice mean instead favours removing small components (an empty slice predicted empty scores 1), which
    can lower every patient's Dice: measured on the LGG out-of-fold cases (.notes/crossval.md)."""

    def __init__(self, n_candidates: int, n_regions: int) -> None:
        self.shape = (n_candidates, n_regions, 3)
        self.counts: dict[str, np.ndarray] = {}

    def add(self, candidate: int, subject: str, pred: np.ndarray, gt: np.ndarray) -> None:
        """Count bool (K, *S) `pred` against `gt` for `candidate` under `subject`."""
        acc = self.counts.setdefault(subject, np.zeros(self.shape))
        acc[candidate] += mask_counts(pred, gt)[:, :3]

    def means(self) -> np.ndarray:
        """(n_candidates, K) mean Dice over subjects."""
        if not self.counts:
            return np.zeros(self.shape[:2])
        counts = torch.from_numpy(np.stack(list(self.counts.values())))  # (subjects, candidates, K, 3)
        return dice_from_counts(counts).numpy().mean(axis=0)

    @property
    def n_subjects(self) -> int:
        return len(self.counts)


def case_subject(case_id: str, attrs: dict[str, Any]) -> str:
    """The subject (patient) a stored case belongs to; a case without one is its own subject (the fold rule)."""
    return attrs.get("subject") or case_id


def _candidates(subject_scope: bool) -> list[RegionRule]:
    """Per case: keep the largest component, remove components below each size; the same over a subject's stacked
    slices when some subject has several (2D slice stores)."""
    scopes = ("case", "subject") if subject_scope else ("case",)
    return [rule for scope in scopes for rule in (RegionRule(keep_largest=True, scope=scope),
                                                  *(RegionRule(min_volume=v, scope=scope)
                                                    for v in MIN_VOLUME_CANDIDATES))]


@dataclass
class Truth:
    """Where the ground truth comes from: a case id's stored-frame label (Z, Y, X) and its attrs."""

    label: Callable[[str], np.ndarray]
    attrs: Callable[[str], dict[str, Any]]

    @classmethod
    def of_pairs(cls, pairs: Mapping[str, tuple[np.ndarray, dict[str, Any]]]) -> Truth:
        """From case id -> (label, attrs) (hand-built cases)."""
        return cls(lambda cid: pairs[cid][0], lambda cid: pairs[cid][1])


def store_truth(store: Store) -> Truth:
    return Truth(store.read_label, store.case_attrs)


def choose_postprocessing(cache: ProbabilityCache, truth: Truth, case_ids: Sequence[str],
                          regions: dict[str, list[int]]) -> tuple[Postprocessing, list[dict[str, Any]]]:
    """nnU-Net's rule on the cached predictions of `case_ids`: per region in order (containers first), try every
    candidate and keep the best one only if the mean Dice over regions rises and no region's mean Dice drops.
    First each region's probability threshold (`THRESHOLD_CANDIDATES`; 0.5 unless another wins), then the
    connected-component rules on the masks those thresholds give. Dice is per subject (`SubjectDice`: a patient's
    slices stacked; a 3D case is its own subject). On 2D slice stores the component candidates also act on a
    subject's stacked slices ("subject" scope; `stack_place`).

    Streams: one pass over the cases per region and stage, one stack (a 3D case, or a patient's slices) in memory at
    a time. Returns the rules and every candidate's mean Dice per region (for postprocessing.json)."""
    cases = [cid for cid in case_ids if cache.has(cid)]
    chosen = Postprocessing()
    table: list[dict[str, Any]] = []
    if not cases:
        return chosen, table
    attrs_of = {cid: truth.attrs(cid) for cid in cases}
    _choose_thresholds(cache, truth, cases, attrs_of, regions, chosen, table)
    _choose_components(cache, truth, cases, attrs_of, regions, chosen, table)
    return chosen, table


def _accept(name: str, means: np.ndarray, cands: Sequence[RegionRule], chosen: Postprocessing,
            table: list[dict[str, Any]], names: Sequence[str]) -> None:
    """Record every candidate's scores; keep the best one (`means[1 + c]`) if it beats the rules so far
    (`means[0]`) on the mean over regions without lowering any region."""
    base = means[0]
    for rule, row in zip(cands, means[1:], strict=True):
        table.append({"region": name, "rule": rule.describe(), "mean_dice": float(row.mean()),
                      **{f"dice_{n}": float(v) for n, v in zip(names, row, strict=True)}})
    ok = [(row.mean(), c) for c, row in enumerate(means[1:])
          if row.mean() > base.mean() + 1e-9 and np.all(row >= base - 1e-9)]
    if ok:
        score, c = max(ok, key=lambda t: (t[0], -t[1]))  # ties: the first (simplest) candidate
        chosen.rules[name] = cands[c]
        logger.info("postprocessing %s: %s (mean Dice over regions %.4f -> %.4f)", name, cands[c].describe(),
                    base.mean(), score)
    else:
        logger.info("postprocessing %s: %s kept (no candidate raises the mean without lowering a region)", name,
                    chosen.rules[name].describe() if name in chosen.rules else "none")


def _truth_masks(truth: Truth, cid: str, regions: dict[str, list[int]]) -> np.ndarray:
    label = truth.label(cid)
    return np.stack([np.isin(label, vals) for vals in regions.values()])


def _choose_thresholds(cache: ProbabilityCache, truth: Truth, cases: Sequence[str], attrs_of: dict[str, Any],
                       regions: dict[str, list[int]], chosen: Postprocessing, table: list[dict[str, Any]]) -> None:
    """Each region's probability threshold in turn, the others at their chosen values (undertrained or
    foreground-oversampled models are often miscalibrated: BraTS out of fold, .notes/crossval.md)."""
    names = list(regions)
    for k, name in enumerate(names):
        current = chosen.thresholds(names)
        cands = [RegionRule(threshold=t) for t in THRESHOLD_CANDIDATES if t != current[k]]
        trials = [current[k], *(r.threshold for r in cands)]
        scores = SubjectDice(len(trials), len(names))
        for cid in tqdm(cases, desc=f"threshold {name}", unit="case", dynamic_ncols=True):
            probs, gt = cache.get(cid), _truth_masks(truth, cid, regions)
            for c, t in enumerate(trials):
                tv = current.copy()
                tv[k] = t
                scores.add(c, case_subject(cid, attrs_of[cid]),
                           clip_to_containers(probs > tv.reshape(-1, *([1] * (probs.ndim - 1))), regions), gt)
        _accept(name, scores.means(), cands, chosen, table, names)


def _choose_components(cache: ProbabilityCache, truth: Truth, cases: Sequence[str], attrs_of: dict[str, Any],
                       regions: dict[str, list[int]], chosen: Postprocessing, table: list[dict[str, Any]]) -> None:
    """Per region: keep the largest component or remove small ones (per case; over a subject's stacked slices)."""
    names = list(regions)
    places = {cid: stack_place(cid, attrs_of[cid]) for cid in cases}
    stacks = group_by_stack(cases, places.__getitem__)
    for k, name in enumerate(names):
        threshold = chosen.thresholds(names)[k]
        cands = [replace(r, threshold=float(threshold))
                 for r in _candidates(subject_scope=any(len(g) > 1 for g in stacks))]
        scores = SubjectDice(len(cands) + 1, len(names))  # candidate 0: the rules chosen so far
        for group in tqdm(stacks, desc=f"postprocessing {name}", unit="stack", dynamic_ncols=True):
            positions = [places[c].position for c in group]
            spacing = component_spacing(attrs_of[group[0]])
            what = f"{group[0]} ({len(group)} cases)"
            masks = [binarise(cache.get(cid), regions, chosen) for cid in group]  # as `decode` reads them
            others = Postprocessing({n: r for n, r in chosen.rules.items() if n != name})
            ruled = postprocess_stack(masks, positions, regions, others, spacing, what)
            # region k as `postprocess_stack` hands it to its rule: thresholded, clipped to its cleaned containers
            # (the regions after k have no rule yet: the choice goes in region order)
            current = chosen.rules.get(name, RegionRule(threshold=float(threshold)))
            variants = rule_variants([m[k] for m in ruled], positions, [current, *cands], spacing, what)
            truths = [_truth_masks(truth, cid, regions) for cid in group]
            for c, variant in enumerate(variants):
                for cid, m, region_k, gt in zip(group, ruled, variant, truths, strict=True):
                    trial = m.copy()
                    trial[k] = region_k
                    clip_to_containers(trial, regions)  # as `postprocess` and `decode` do
                    scores.add(c, case_subject(cid, attrs_of[cid]), trial, gt)
        _accept(name, scores.means(), cands, chosen, table, names)


def write_postprocessing(path: Path, pp: Postprocessing, table: list[dict[str, Any]],
                         chosen_on: dict[str, Any]) -> Path:
    """postprocessing.json: the rules (what `launch/predict.py --postprocess` applies), where they were chosen,
    the criterion and every candidate's score."""
    doc = json.dumps({"rules": pp.to_dict(), "chosen_on": chosen_on,
                      "criterion": "nnU-Net: per region in order, keep a rule only if the mean Dice over regions "
                                   "rises and no region's mean Dice drops (Dice per subject: a patient's slices "
                                   "stacked; a 3D case is its own subject)", "candidates": table}, indent=1)
    return atomic_write(path, lambda tmp: tmp.write_text(doc, encoding="utf-8"))
