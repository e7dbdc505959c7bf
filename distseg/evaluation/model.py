"""Evaluate a trained model on store cases: predict whole cases, score them, choose the postprocessing rule.

    result = evaluate_model(load_model(run_dir), Store.open(store), store.case_ids(folds=[0], labelled_only=True),
                            out_dir, PredictSettings(overlap=0.5, tta=False))

Predictions are scored in the source grid (the whole 240x240x155 BraTS volume, the 2D image at its source size), as
the challenge and the `--pred/--gt` files mode do. Each prediction is also written (NIfTI / mask PNG + overlay) under
``out_dir/predictions``. The connected-component rule is chosen as nnU-Net does: on these cases, per region in
order, keep the candidate that raises the mean Dice, and store it beside the model (`postprocessing.json`) so that
`launch/predict.py --postprocess` applies exactly what was measured. The postprocessed cases are then scored too
(``out_dir/postprocessed``) so the effect on Dice and HD95 is visible.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from distseg.core.fileio import atomic_write
from distseg.data.geometry import paste_to_source, restore_to_source_geometry
from distseg.data.labels import to_source_convention
from distseg.data.store import Store
from distseg.data.targets import regions_to_labels
from distseg.evaluation.report import EvaluationMeta, EvaluationResult, ModelInfo, log_evaluation
from distseg.evaluation.run import evaluate_arrays
from distseg.evaluation.scoring import ScoredCase, region_masks
from distseg.inference.postprocess import Postprocessing, RegionRule, postprocess
from distseg.inference.predictor import POSTPROCESSING_FILE, LoadedModel, Predictor
from distseg.metrics import mask_counts

logger = logging.getLogger(__name__)

MIN_VOLUME_CANDIDATES = (10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0)
"""Component-size thresholds tried per region (mm^3 in 3D, pixels in 2D)."""


@dataclass
class PredictSettings:
    """How the model is run on each case (the predictor's knobs)."""

    overlap: float = 0.5
    tta: bool = False
    window_batch: int = 4
    device: str = "cpu"
    precision: str = "auto"


@dataclass
class _Kept:
    """What postprocessing selection needs of one case: stored-frame masks (small: the crop) + its attributes."""

    case_id: str
    pred: np.ndarray  # bool (K, Z, Y, X) region masks as predicted
    gt: np.ndarray  # bool (K, Z, Y, X)
    attrs: dict[str, Any]


@dataclass
class ModelEvaluation:
    """What `evaluate_model` produced."""

    result: EvaluationResult
    postprocessing: Postprocessing
    candidates: list[dict[str, Any]] = field(default_factory=list)
    postprocessed: EvaluationResult | None = None


def _source_spacing(attrs: dict[str, Any]) -> tuple[float, ...] | None:
    """Voxel size per axis of the source grid (mm), or None for 2D images (pixels)."""
    if attrs.get("source_ndim") == 2:
        return None
    spacing = attrs["spacing"]  # stored (z, y, x)
    return tuple(float(spacing[a]) for a in attrs["store_to_source_axes"])


def _scored(case_id: str, pred_masks: np.ndarray, regions: dict[str, list[int]], attrs: dict[str, Any],
            gt_label: np.ndarray, source: str) -> ScoredCase:
    """Stored-frame region masks -> source-grid labels in the source convention -> region masks vs ground truth."""
    convention = attrs["label_convention"]
    pred_src = to_source_convention(paste_to_source(regions_to_labels(pred_masks, regions), attrs), convention)
    gt_src = restore_to_source_geometry(gt_label, attrs)
    names = dict(regions)
    return ScoredCase(case_id, region_masks(pred_src, convention, names, what=f"{case_id} prediction"),
                      region_masks(gt_src, convention, names, what=f"{case_id} ground truth"),
                      _source_spacing(attrs), subject=attrs.get("subject"), pred_source=source, gt_source=source,
                      label_convention=convention)


def _meta(model: LoadedModel, store: Store, folds: Sequence[int] | None, regions: Sequence[str],
          note: str = "") -> EvaluationMeta:
    run = model.meta.get("run")
    minutes = None
    if run and (Path(run) / "summary.json").is_file():
        summary = json.loads((Path(run) / "summary.json").read_text(encoding="utf-8"))
        seconds = summary.get("elapsed_s")  # training-loop seconds over every run of the job (distseg.train.trainer)
        minutes = float(seconds) / 60.0 if seconds else None
    info = ModelInfo(name=model.config.model.name, parameters=model.parameters, run=run, tag=model.meta.get("tag"),
                     training_minutes=minutes)
    kind = store.kind
    return EvaluationMeta(kind=kind, regions=list(regions), model=info,
                          sources={"store": str(store.path), "folds": str(list(folds) if folds else "all"),
                                   "model": model.source, **({"postprocessing": note} if note else {})},
                          hd95_unit="mm" if kind == "brats3d" else "px")


def _mean_dice(kept: list[_Kept], k: int, masks_k: list[np.ndarray]) -> float:
    """Mean over cases of region k's Dice (BraTS: both empty -> 1), from stored-frame masks (Dice is crop-free)."""
    values = []
    for item, pred in zip(kept, masks_k, strict=True):
        tp, fp, fn, _ = mask_counts(pred[None], item.gt[k][None])[0]
        values.append(1.0 if tp + fp + fn == 0 else 2.0 * tp / (2.0 * tp + fp + fn))
    return float(np.mean(values)) if values else float("nan")


def choose_postprocessing(kept: list[_Kept], regions: dict[str, list[int]]) -> tuple[Postprocessing, list[dict]]:
    """Greedy per region, in region order (containers first): try 'keep largest' and each minimum component volume,
    keep the rule with the highest mean Dice if it beats no postprocessing. Returns the rules and every candidate's
    score (for postprocessing.json)."""
    chosen = Postprocessing()
    table: list[dict[str, Any]] = []
    names = list(regions)
    for k, name in enumerate(names):
        candidates = [RegionRule(), RegionRule(keep_largest=True),
                      *(RegionRule(min_volume=v) for v in MIN_VOLUME_CANDIDATES)]
        best_rule, best_score = RegionRule(), -1.0
        for rule in candidates:
            trial = Postprocessing({**chosen.rules, name: rule})
            masks_k = [postprocess(it.pred, regions, trial, _spacing_for(it))[k] for it in kept]
            score = _mean_dice(kept, k, masks_k)
            table.append({"region": name, "rule": rule.describe(), "mean_dice": score})
            if score > best_score + 1e-9 or (rule.is_identity() and score >= best_score - 1e-9):
                best_rule, best_score = rule, score
        if not best_rule.is_identity():
            chosen.rules[name] = best_rule
        logger.info("postprocessing %s: %s (mean Dice %.4f)", name, best_rule.describe(), best_score)
    return chosen, table


def evaluate_model(model: LoadedModel, store: Store, case_ids: Sequence[str], out_dir: Path,
                   settings: PredictSettings | None = None, folds: Sequence[int] | None = None,
                   choose_pp: bool = True, write_predictions: bool = True, tensorboard: bool = True
                   ) -> ModelEvaluation:
    """Predict, write and score `case_ids` of `store` with `model`; choose and store the postprocessing rule."""
    from distseg.inference.outputs import write_prediction

    settings = settings or PredictSettings()
    predictor = Predictor(model, overlap=settings.overlap, tta=settings.tta, window_batch=settings.window_batch,
                          device=settings.device, precision=settings.precision)
    regions = predictor.io.decode_regions
    pred_dir = out_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    kept: list[_Kept] = []
    scored: list[ScoredCase] = []
    for cid in tqdm(case_ids, desc="predict", unit="case", dynamic_ncols=True):
        case = store.case_arrays(cid)
        if case.label is None:
            raise ValueError(f"{store.path}: case {cid!r} has no label; evaluation needs labelled cases")
        pred = predictor.predict(case)
        if write_predictions:
            write_prediction(pred_dir, case, pred, predictor.io.kind, predictor.io.channels)
        gt_masks = np.stack([np.isin(case.label, vals) for vals in regions.values()])
        kept.append(_Kept(cid, pred.masks, gt_masks, case.attrs))
        scored.append(_scored(cid, pred.masks, regions, case.attrs, case.label, f"{store.path}:{cid}"))
    result = evaluate_arrays(scored, out_dir, _meta(model, store, folds, list(regions)), total=len(scored))
    evaluation = ModelEvaluation(result, Postprocessing())
    if choose_pp and kept:
        pp, table = choose_postprocessing(kept, regions)
        evaluation.postprocessing, evaluation.candidates = pp, table
        doc = json.dumps({"rules": pp.to_dict(), "chosen_on": {"store": str(store.path), "cases": list(case_ids),
                                                               "model": model.source},
                          "criterion": "mean Dice per region, greedy in region order", "candidates": table}, indent=1)
        targets = [out_dir / POSTPROCESSING_FILE]
        home = model.meta.get("run") or (str(Path(model.source).parent) if Path(model.source).is_file() else None)
        if home:
            targets.append(Path(home) / POSTPROCESSING_FILE)
        for target in targets:
            atomic_write(target, lambda tmp, d=doc: tmp.write_text(d, encoding="utf-8"))
        if pp.rules:
            post = [_scored(it.case_id, postprocess(it.pred, regions, pp, _spacing_for(it)), regions, it.attrs,
                            store.case_arrays(it.case_id).label, f"{store.path}:{it.case_id}") for it in kept]
            evaluation.postprocessed = evaluate_arrays(
                post, out_dir / "postprocessed",
                _meta(model, store, folds, list(regions), note=json.dumps(pp.to_dict())), total=len(post))
    run = model.meta.get("run")
    if tensorboard and run and Path(run).is_dir():
        log_evaluation(Path(run) / "tb", result.summary, model.step or 0, text=result.markdown)
    return evaluation


def _spacing_for(item: _Kept) -> list[float] | None:
    return None if item.attrs.get("source_ndim") == 2 else item.attrs.get("spacing")
