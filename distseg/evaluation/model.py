"""Evaluate a model (or an ensemble) on store cases: predict whole cases, score them, and, on validation cases only,
choose the postprocessing (`distseg.evaluation.postprocessing`).

    models = load_models([run_dir])                                  # distseg.inference.ensemble
    ev = evaluate_model(models, store, store.case_ids(folds=[0], labelled_only=True), out_dir,
                        role="validation", choose_pp=True)           # out_dir/postprocessing.json
    ev = evaluate_model(models, store, store.case_ids(split="test", labelled_only=True), out_dir2,
                        role="test", apply_pp=models.postprocessing) # out_dir2 and out_dir2/postprocessed

Predictions are scored in the source grid (the whole 240x240x155 BraTS volume, the 2D image at its source size), as
the challenge and the `--pred/--gt` files mode do. Cases stream through one at a time: each prediction is written
(NIfTI / mask PNG + overlay, under ``out_dir/predictions``), scored, and its stored-frame probabilities are kept
on disk (float16, ``out_dir/probabilities``) for the choices; memory stays flat however many cases there are. A
case that fails to predict is a failed row (Dice 0, HD95 penalty) and the others go on.

Postprocessing is chosen (`distseg.evaluation.postprocessing`) only on cases whose role is "validation" (choosing on
the test split is refused) and written to ``out_dir/postprocessing.json``, never beside the model as a side effect; a
cross-validation folder holds the rule chosen on its pooled out-of-fold predictions (`distseg.evaluation.crossval`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from distseg.data.geometry import restore_to_source_geometry
from distseg.data.store import Store
from distseg.evaluation.meta import EvaluationMeta, ModelInfo
from distseg.evaluation.postprocessing import (
    PROBABILITIES_DIR,
    ProbabilityCache,
    choose_postprocessing,
    store_truth,
    write_postprocessing,
)
from distseg.evaluation.report import EvaluationResult, log_evaluation
from distseg.evaluation.run import evaluate_arrays
from distseg.evaluation.scoring import CaseFailure, ScoredCase, region_masks
from distseg.inference.ensemble import ModelSet
from distseg.inference.loading import POSTPROCESSING_FILE, ModelIO
from distseg.inference.postprocess import (
    Postprocessing,
    group_by_stack,
    stack_place,
)
from distseg.inference.predictor import Predictor, decode_stack

logger = logging.getLogger(__name__)



@dataclass
class PredictSettings:
    """How the model is run on each case (the predictor's knobs)."""

    overlap: float = 0.5
    tta: bool = False
    window_batch: int = 4
    device: str = "cpu"
    precision: str = "auto"


@dataclass
class ModelEvaluation:
    """What `evaluate_model` produced."""

    result: EvaluationResult
    postprocessing: Postprocessing
    """The rule chosen here (choose_pp) or applied (apply_pp); empty otherwise."""
    candidates: list[dict[str, Any]] = field(default_factory=list)
    postprocessed: EvaluationResult | None = None


# ------------------------------------------------------------------------------------------------ per-case stores
def _source_spacing(attrs: dict[str, Any]) -> tuple[float, ...] | None:
    """Voxel size per axis of the source grid (mm), or None for 2D images (pixels)."""
    if attrs.get("source_ndim") == 2:
        return None
    spacing = attrs["spacing"]  # stored (z, y, x)
    return tuple(float(spacing[a]) for a in attrs["store_to_source_axes"])


def _scored(case_id: str, pred_source_labels: np.ndarray, io: ModelIO, attrs: dict[str, Any],
            gt_label: np.ndarray, source: str) -> ScoredCase:
    """The prediction as written (source grid and convention: `distseg.inference.predictor.decode`) -> region masks
    vs the ground truth's, in the source grid."""
    convention = attrs["label_convention"]
    gt_src = restore_to_source_geometry(gt_label, attrs)
    names = io.decode_regions
    gt = region_masks(gt_src, convention, names, what=f"{case_id} ground truth")
    if io.target == "binary" and len(next(iter(names.values()))) > 1:  # a 0/1 foreground mask (see `decode`)
        pred = (np.asarray(pred_source_labels) > 0)[None]
    else:
        pred = region_masks(pred_source_labels, convention, names, what=f"{case_id} prediction")
    return ScoredCase(case_id, pred, gt, _source_spacing(attrs), subject=attrs.get("subject"), pred_source=source,
                      gt_source=source, label_convention=convention)


def model_info(models: ModelSet) -> ModelInfo:
    """Name, size, run and training minutes of a model; an ensemble sums its members' parameters and minutes."""
    minutes: list[float] = []
    for m in models.members:
        run = m.meta.get("run")
        if run and (Path(run) / "summary.json").is_file():
            summary = json.loads((Path(run) / "summary.json").read_text(encoding="utf-8"))
            seconds = summary.get("elapsed_s")  # training-loop seconds over every run of the job
            if seconds:
                minutes.append(float(seconds) / 60.0)
    first = models.members[0]
    params = [m.parameters for m in models.members]
    n = len(models.members)
    return ModelInfo(name=first.config.model.name if n == 1 else f"{first.config.model.name} x{n}",
                     parameters=sum(p for p in params if p) if all(params) else None,
                     run=first.meta.get("run") if n == 1 else models.source, tag=first.meta.get("tag") if n == 1
                     else None, training_minutes=sum(minutes) if len(minutes) == n else None)


def evaluation_meta(models: ModelSet, store: Store, what: str, regions: Sequence[str], role: str,
                    note: str = "", folds: Sequence[int] | None = None) -> EvaluationMeta:
    kind = store.kind
    return EvaluationMeta(kind=kind, regions=list(regions), model=model_info(models), role=role,
                          sources={"store": str(store.path), "cases": what, "model": models.describe(),
                                   **({"folds": str(list(folds))} if folds is not None else {}),
                                   **({"postprocessing": note} if note else {})},
                          hd95_unit="mm" if kind == "brats3d" else "px")


# ------------------------------------------------------------------------------------------------ predicting
def predict_and_score(predictor: Predictor, store: Store, case_ids: Sequence[str], pred_dir: Path | None,
                      cache: ProbabilityCache | None, desc: str = "predict") -> Iterator[ScoredCase | CaseFailure]:
    """Predict each case, write its outputs (`pred_dir`) and probabilities (`cache`), and yield it scored; a case
    that fails becomes a `CaseFailure` (scored as failed: Dice 0, HD95 penalty) and the next one goes on."""
    from distseg.inference.outputs import write_prediction

    if pred_dir is not None:
        pred_dir.mkdir(parents=True, exist_ok=True)
    for cid in tqdm(case_ids, desc=desc, unit="case", dynamic_ncols=True):
        source = f"{store.path}:{cid}"
        try:
            case = store.case_arrays(cid)
            if case.label is None:
                raise ValueError(f"{source}: no label; evaluation needs labelled cases")
            pred = predictor.predict(case)
            if pred_dir is not None:
                write_prediction(pred_dir, case, pred, predictor.io.kind, predictor.io.channels)
            if cache is not None:
                cache.put(cid, pred.probabilities)
            item = _scored(cid, pred.labels_source, predictor.io, case.attrs, case.label, source)
        except Exception as e:  # one bad case never stops the others; its row says why
            logger.exception("case %s failed", cid)
            if cache is not None:  # a file from an earlier run into this folder is not this model's prediction
                cache.discard(cid)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            yield CaseFailure(cid, reason if cid in reason else f"{source}: {reason}", pred_source=source,
                              gt_source=source)
            continue
        yield item


def postprocessed_cases(cache: ProbabilityCache, store: Store, case_ids: Sequence[str], io: ModelIO,
                        pp: Postprocessing) -> Iterator[ScoredCase | CaseFailure]:
    """The cached predictions with `pp` applied, scored (cases without cached probabilities are failed rows).

    One stack at a time (`group_by_stack`: a subject's 2D slices together when `pp` has "subject" rules, else one
    case), so a subject rule sees the patient's slices as prediction applies it."""
    stacked = pp.has_subject_rules()
    places = {cid: stack_place(cid, store.case_attrs(cid)) if stacked else stack_place(cid, {})
              for cid in case_ids}
    for group in group_by_stack(case_ids, places.__getitem__):
        present = [cid for cid in group if cache.has(cid)]
        for cid in group:
            if not cache.has(cid):
                source = f"{store.path}:{cid}"
                yield CaseFailure(cid, f"{source}: no prediction (the case failed to predict)", pred_source=source,
                                  gt_source=source)
        if not present:
            continue
        attrs = [store.case_attrs(cid) for cid in present]
        decoded = decode_stack([cache.get(cid) for cid in present], attrs, [places[c].position for c in present],
                               io, pp, what=f"{store.path}:{present[0]}")
        for cid, a, (_, _, labels_source) in zip(present, attrs, decoded, strict=True):
            yield _scored(cid, labels_source, io, a, store.read_label(cid), f"{store.path}:{cid}")


# ------------------------------------------------------------------------------------------------ choosing
# ------------------------------------------------------------------------------------------------ the whole job
def evaluate_model(models: ModelSet, store: Store, case_ids: Sequence[str], out_dir: Path,
                   settings: PredictSettings | None = None, role: str = "validation", what: str = "",
                   choose_pp: bool = False, apply_pp: Postprocessing | None = None, write_predictions: bool = True,
                   tensorboard: bool = True, folds: Sequence[int] | None = None) -> ModelEvaluation:
    """Predict, write and score `case_ids` of `store` with `models` (streaming; see the module docstring).

    `role`: "validation" or "test" (recorded in every report). `choose_pp`: choose the postprocessing on these
    cases (validation only; refused on "test") and write it to ``out_dir/postprocessing.json``. `apply_pp`: a rule
    chosen elsewhere (e.g. a CV folder's), applied and scored under ``out_dir/postprocessed``.
    """
    if choose_pp and role != "validation":
        raise ValueError(f"choosing postprocessing on {role} cases is refused: a choice made on the cases it is "
                         "then reported on makes the report optimistic; choose on validation (out-of-fold) cases")
    settings = settings or PredictSettings()
    predictor = Predictor(models, overlap=settings.overlap, tta=settings.tta, window_batch=settings.window_batch,
                          device=settings.device, precision=settings.precision)
    regions = predictor.io.decode_regions
    what = what or f"{len(case_ids)} cases"
    # Probabilities on disk only when a postprocessing rule is chosen or applied here (they are what it reads back).
    cache = ProbabilityCache(out_dir / PROBABILITIES_DIR) if choose_pp or apply_pp is not None else None
    items = predict_and_score(predictor, store, case_ids, out_dir / "predictions" if write_predictions else None,
                              cache)
    result = evaluate_arrays(items, out_dir, evaluation_meta(models, store, what, list(regions), role, folds=folds),
                             total=len(case_ids))
    evaluation = ModelEvaluation(result, Postprocessing())
    pp = apply_pp
    if choose_pp:
        pp, evaluation.candidates = choose_postprocessing(cache, store_truth(store), case_ids, regions)
        write_postprocessing(out_dir / POSTPROCESSING_FILE, pp, evaluation.candidates,
                             {"store": str(store.path), "cases": list(case_ids), "model": models.describe()})
    if pp is not None:
        evaluation.postprocessing = pp
        if pp.rules and cache is not None:
            note = json.dumps(pp.to_dict())
            evaluation.postprocessed = evaluate_arrays(
                postprocessed_cases(cache, store, case_ids, predictor.io, pp), out_dir / "postprocessed",
                evaluation_meta(models, store, what, list(regions), role, note=note, folds=folds),
                total=len(case_ids))
    run = models.members[0].meta.get("run") if len(models.members) == 1 else None
    if tensorboard and run and Path(run).is_dir():
        log_evaluation(Path(run) / "tb", result.summary, models.members[0].step or 0, text=result.markdown)
    return evaluation
