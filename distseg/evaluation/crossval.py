"""K-fold cross-validation over the non-test subjects: one training per fold, out-of-fold predictions of every
training-pool case, the choices made on them (nnU-Net's `find_best_configuration` rule), and the fold ensemble.

    plan = CrossvalPlan.create(config_path, overrides, folds=None, output=None)   # reads the store's folds
    run_folds(plan, launcher)              # each fold: `deepspeed ... launch/train.py --config C data.val_folds=[k]`
    finish(plan, settings)                 # out-of-fold predictions, metrics, postprocessing, ensemble.json

A CV folder (``<run.output_root>/crossval/<run.name>/`` unless given)::

    crossval.json                the plan: config, overrides, store, folds, each fold's status and checkpoint
    runs/fold_<k>/               fold k's training run (validated on fold k only: its "best" is chosen there)
    oof/                         pooled out-of-fold evaluation (role "validation": these cases made the choices)
      predictions/               each case predicted by the fold model that never trained on it (source grid)
      probabilities/             stored-frame float16 probabilities, what the choices read back
      postprocessed/             the same cases with the chosen postprocessing
    postprocessing.json          chosen on the pooled out-of-fold predictions
    ensemble.json                the fold models: the folder is a model for `launch/predict.py --model CV_DIR`
    summary.md                   per fold, out of fold, the choices (and the test split with `--test`)
    test/                        with `--test`: the ensemble (+ postprocessing) on the test split (role "test")

The test split (`preprocess ... --test-subjects/--test-fraction`) is never trained on, validated on or chosen on:
the store's `case_ids` leaves it out unless asked for by name, and only `--test` reads it, after every choice is
written. Training is the real launcher in a subprocess, one fold after another; a rerun skips the folds recorded
as done and resumes the others from their newest complete checkpoint (the trainer's own resume).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distseg.core.fileio import atomic_write
from distseg.data.store import Store
from distseg.evaluation.crossval_plan import (  # re-exported: the plan is part of this module's API
    OOF_MODELS_FILE,
    PLAN_FILE,
    CrossvalError,
    CrossvalPlan,
    check_fold_cases,
    check_oof_models,
    default_env,
    fold_config,
    fold_done,
    fold_model_stamp,
    fold_models,
    launcher_command,
    parse_folds,
    run_folds,
)
from distseg.evaluation.model import (
    ModelEvaluation,
    PredictSettings,
    evaluate_model,
    evaluation_meta,
    postprocessed_cases,
    predict_and_score,
)
from distseg.evaluation.postprocessing import (
    PROBABILITIES_DIR,
    ProbabilityCache,
    choose_postprocessing,
    store_truth,
    write_postprocessing,
)
from distseg.evaluation.report import EvaluationResult
from distseg.evaluation.run import evaluate_arrays
from distseg.evaluation.scoring import CaseFailure, ScoredCase
from distseg.inference.ensemble import ModelSet, load_models, write_ensemble
from distseg.inference.loading import POSTPROCESSING_FILE, load_model
from distseg.inference.predictor import Predictor

__all__ = ["OOF_MODELS_FILE", "PLAN_FILE", "CrossvalError", "CrossvalPlan", "CrossvalResult", "check_fold_cases",
           "check_oof_models", "default_env", "fold_model_stamp",
           "evaluate_test", "finish", "fold_config", "fold_done", "fold_models", "launcher_command",
           "out_of_fold_cases", "parse_folds", "run_folds", "write_summary"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ out of fold
@dataclass
class CrossvalResult:
    """What `finish` produced."""

    oof: EvaluationResult
    postprocessing_rules: dict[str, Any]
    postprocessed: EvaluationResult | None
    test: ModelEvaluation | None = None
    fold_models: dict[int, str] = field(default_factory=dict)


def out_of_fold_cases(plan: CrossvalPlan, store: Store) -> dict[int, list[str]]:
    return {k: store.case_ids(folds=[k], labelled_only=True) for k in plan.folds}


def finish(plan: CrossvalPlan, settings: PredictSettings, test: bool = False) -> CrossvalResult:
    """Out-of-fold prediction of every training-pool case, the pooled evaluation, the postprocessing chosen on it,
    the ensemble file and summary.md; with `test`, then the ensemble on the test split."""
    store = Store.open(plan.store)
    tags = fold_models(plan)
    check_fold_cases(plan, store)
    by_fold = out_of_fold_cases(plan, store)
    all_cases = [c for k in plan.folds for c in by_fold[k]]
    oof_dir = plan.path / "oof"
    cache = ProbabilityCache(oof_dir / PROBABILITIES_DIR)
    first = load_model(tags[plan.folds[0]], settings.device)
    regions = first.io.decode_regions
    what = f"out of fold: folds {plan.folds} ({len(all_cases)} cases)"
    meta = evaluation_meta(ModelSet([first], None, str(plan.path)), store, what, list(regions), "validation")
    meta.sources["model"] = f"fold models of {plan.path}"

    def oof_items() -> Iterator[ScoredCase | CaseFailure]:
        for k in plan.folds:  # one fold model in memory at a time
            model = load_model(tags[k], settings.device)
            predictor = Predictor(model, overlap=settings.overlap, tta=settings.tta,
                                  window_batch=settings.window_batch, device=settings.device,
                                  precision=settings.precision)
            yield from predict_and_score(predictor, store, by_fold[k], oof_dir / "predictions", cache,
                                         desc=f"fold {k}")

    (plan.path / OOF_MODELS_FILE).unlink(missing_ok=True)  # the probabilities are about to change
    oof = evaluate_arrays(oof_items(), oof_dir, meta, total=len(all_cases))
    stamp = json.dumps(fold_model_stamp(plan, tags), indent=1)
    atomic_write(plan.path / OOF_MODELS_FILE, lambda tmp: tmp.write_text(stamp, encoding="utf-8"))
    pp, table = choose_postprocessing(cache, store_truth(store), all_cases, regions)
    write_postprocessing(plan.path / POSTPROCESSING_FILE, pp, table,
                         {"store": plan.store, "cases": all_cases, "model": f"out-of-fold predictions of {plan.path}",
                          "folds": plan.folds})
    post = None
    if pp.rules:
        post_meta = evaluation_meta(ModelSet([first], None, str(plan.path)), store, what, list(regions), "validation",
                                    note=json.dumps(pp.to_dict()))
        post = evaluate_arrays(postprocessed_cases(cache, store, all_cases, first.io, pp), oof_dir / "postprocessed",
                               post_meta, total=len(all_cases))
    write_ensemble(plan.path, [tags[k] for k in plan.folds],
                   {"folds": plan.folds, "config": plan.config, "overrides": plan.overrides, "store": plan.store})
    result = CrossvalResult(oof, pp.to_dict(), post, fold_models={k: str(t) for k, t in tags.items()})
    if test:
        result.test = evaluate_test(plan, settings)
    write_summary(plan, result)
    return result


def evaluate_test(plan: CrossvalPlan, settings: PredictSettings) -> ModelEvaluation | None:
    """The fold ensemble with its chosen postprocessing on the test split (role "test"); None without one."""
    store = Store.open(plan.store)
    cases = store.case_ids(labelled_only=True, split="test")
    if not cases:
        logger.warning("%s: no labelled test-split case; preprocess with --test-subjects/--test-fraction to report "
                       "a number no choice touched", store.path)
        return None
    models = load_models([plan.path], settings.device)
    return evaluate_model(models, store, cases, plan.path / "test", settings, role="test",
                          what=f"test split ({len(cases)} cases)", apply_pp=models.postprocessing, tensorboard=False)


# ------------------------------------------------------------------------------------------------ summary
def _fold_line(plan: CrossvalPlan, k: int, tag: str) -> str:
    summary = plan.run_dir(k) / "summary.json"
    s = json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else {}
    dice = s.get("val_dice") or {}
    cells = ", ".join(f"{name} {v:.3f}" for name, v in dice.items())
    minutes = (s.get("elapsed_s") or 0) / 60
    return (f"| {k} | {Path(tag).name} | {s.get('step', '?')} | {minutes:.1f} | {cells or 'no validation'} |")


def _mean_line(summary: Sequence[dict[str, Any]], label: str) -> str:
    means = {r["region"]: r for r in summary if r.get("metric") == "dice"}
    hd = {r["region"]: r for r in summary if r.get("metric") == "hd95"}
    cells = " | ".join(_num(means[k]["mean"], 3) for k in means)
    hds = " | ".join(_num(hd[k]["mean"], 1) if k in hd else "–" for k in means)
    return f"| {label} | {cells} | {hds} |"


def _num(value: Any, digits: int) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def _lines(result: EvaluationResult, label: str) -> list[str]:
    """Per case, and per subject when cases stack into subjects (2D slices of one patient)."""
    out = [_mean_line(result.summary, label)]
    n_subjects = len({r["subject"] for r in result.subject_rows})
    if result.subject_summary and n_subjects < len({r["case_id"] for r in result.rows}):
        out.append(_mean_line(result.subject_summary, f"{label}, per subject"))
    return out


def write_summary(plan: CrossvalPlan, result: CrossvalResult) -> Path:
    """summary.md of the CV folder: folds, pooled out-of-fold Dice/HD95 (validation), the choices, the test split."""
    regions = [r["region"] for r in result.oof.summary if r.get("metric") == "dice"]
    lines = [f"# Cross-validation: {Path(plan.config).name}", "",
             f"- store: `{plan.store}` ({plan.n_folds} folds; folds run: {plan.folds})",
             f"- overrides: `{' '.join(plan.overrides) or '(none)'}`", "",
             "## Folds (each validated on its own fold only)", "",
             "| fold | checkpoint used | steps | train min | last validation Dice (its own fold) |",
             "| --- | --- | --- | --- | --- |",
             *[_fold_line(plan, k, t) for k, t in sorted(result.fold_models.items())], "",
             "## Mean over cases", "",
             "| cases | " + " | ".join(f"Dice {r}" for r in regions) + " | "
             + " | ".join(f"HD95 {r}" for r in regions) + " |",
             "| --- |" + " --- |" * (2 * len(regions)),
             *_lines(result.oof, "out of fold (validation)")]
    if result.postprocessed is not None:
        lines += _lines(result.postprocessed, "out of fold + postprocessing (validation)")
    if result.test is not None:
        lines += _lines(result.test.result, "test split, ensemble (test)")
        if result.test.postprocessed is not None:
            lines += _lines(result.test.postprocessed, "test split, ensemble + postprocessing (test)")
    from distseg.inference.postprocess import Postprocessing

    rules = ", ".join(f"{k}: {r.describe()}" for k, r in
                      Postprocessing.from_dict(result.postprocessing_rules).rules.items()) or "none"
    lines += ["", f"Postprocessing chosen on the pooled out-of-fold predictions: {rules} (`postprocessing.json`).",
              "Out-of-fold numbers are validation numbers: these cases chose each fold's checkpoint and the "
              "postprocessing. Only the test split is a result.", "",
              "Use the fold ensemble: `python launch/predict.py --model " + plan.folder
              + " --input CASES --output OUT --postprocess`", ""]
    text = "\n".join(lines)
    return atomic_write(plan.path / "summary.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
