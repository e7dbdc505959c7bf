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
import os
import re
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distseg.config import ExperimentConfig, load_config
from distseg.config_files import resolve_config
from distseg.core.exit_codes import OK, PREEMPTED
from distseg.core.fileio import atomic_write
from distseg.data.store import Store
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
from distseg.inference.loading import POSTPROCESSING_FILE, load_model, resolve_checkpoint
from distseg.inference.predictor import Predictor

logger = logging.getLogger(__name__)

PLAN_FILE = "crossval.json"
PLAN_FORMAT = "distseg-crossval/1"


class CrossvalError(Exception):
    """A cross-validation cannot run as asked (the message names the file, fold or key and what was expected)."""


@dataclass
class CrossvalPlan:
    """What a CV folder is: saved as crossval.json, so reruns, job-array tasks and the finishing step agree."""

    folder: str
    config: str
    """The experiment YAML every fold trains (with `overrides`)."""
    overrides: list[str]
    store: str
    folds: list[int]
    """The folds run here; every fold of the store (its ``folds`` root attr) unless a subset was asked for."""
    n_folds: int
    """K of the store's fold assignment."""
    status: dict[str, str] = field(default_factory=dict)
    """{fold: "done" | "pending"} as last seen (informational: `fold_done` decides from the fold's own run, so
    job-array tasks training different folds at once never race on this file)."""
    format: str = PLAN_FORMAT

    @property
    def path(self) -> Path:
        return Path(self.folder)

    def run_dir(self, fold: int) -> Path:
        return self.path / "runs" / f"fold_{fold}"

    def fold_overrides(self, fold: int) -> list[str]:
        """The fold's training overrides: the user's, then the fold's validation fold and run folder (last: win)."""
        return [*self.overrides, f"data.val_folds=[{fold}]", f"run.output_root={self.path}", f"run.name=fold_{fold}"]

    def save(self) -> None:
        self.status = {str(k): "done" if fold_done(self, k) else "pending" for k in range(self.n_folds)
                       if str(k) in self.status or k in self.folds}
        text = json.dumps(asdict(self), indent=1)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / PLAN_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, folder: Path) -> CrossvalPlan:
        f = Path(folder) / PLAN_FILE
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
            if doc.get("format") != PLAN_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {PLAN_FORMAT!r}")
            doc["folder"] = str(Path(folder).resolve())  # where it is now: a CV folder may be moved or copied
            return cls(**doc)
        except (OSError, ValueError, TypeError) as e:
            raise CrossvalError(f"{f}: unreadable cross-validation plan ({e}); expected the file "
                                "launch/crossval.py writes") from e

    @classmethod
    def create(cls, config: str | Path, overrides: Sequence[str], folds: Sequence[int] | None = None,
               output: str | Path | None = None) -> CrossvalPlan:
        """The plan for `config` + `overrides`, merged with an existing crossval.json in the same folder (which
        must have the same config, overrides and store: a CV folder is one experiment)."""
        config = resolve_config(config)  # a path, or the name of a shipped config
        cfg = load_config(config, list(overrides))
        store = Store.open(cfg.data.store)
        n_folds = int(store.attrs.get("folds", 0))
        if n_folds < 2:
            raise CrossvalError(f"{store.path}: root attr folds={n_folds}; expected a store preprocessed with "
                                "--folds K >= 2")
        chosen = sorted(set(folds)) if folds else list(range(n_folds))
        bad = [k for k in chosen if not 0 <= k < n_folds]
        if bad:
            raise CrossvalError(f"--folds {bad}: the store {store.path} has folds 0..{n_folds - 1}")
        for k in chosen:
            if not store.case_ids(folds=[k], labelled_only=True):
                raise CrossvalError(f"{store.path}: fold {k} has no labelled training-pool case; expected every "
                                    "fold to hold cases (fewer folds at preprocessing, or --fold-assignment balanced)")
        folder = Path(output) if output else Path(cfg.run.output_root) / "crossval" / cfg.run.name
        plan = cls(str(folder.expanduser().resolve()), str(Path(config).resolve()), list(overrides),
                   str(store.path), chosen, n_folds)
        if (plan.path / PLAN_FILE).is_file():
            old = cls.load(plan.path)
            for key in ("config", "overrides", "store", "n_folds"):
                if getattr(old, key) != getattr(plan, key):
                    raise CrossvalError(
                        f"{plan.path / PLAN_FILE}: this CV folder was made with {key}={getattr(old, key)!r}, not "
                        f"{getattr(plan, key)!r}; use another --output (one folder = one experiment)")
            plan.status = old.status
        return plan


def fold_config(plan: CrossvalPlan, fold: int) -> ExperimentConfig:
    return load_config(plan.config, plan.fold_overrides(fold))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launcher_command(launcher: Sequence[str], train_script: Path, plan: CrossvalPlan, fold: int) -> list[str]:
    """`launcher` (e.g. ``deepspeed --num_gpus 2``) + the training script + the fold's config and overrides. A
    local `deepspeed` launcher without ``--master_port`` gets a free loopback port, so folds never collide."""
    cmd = list(launcher)
    local = any(Path(c).name == "deepspeed" for c in cmd) and "--hostfile" not in cmd
    if local and "--master_port" not in cmd:
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    return [*cmd, str(train_script), "--config", plan.config, *plan.fold_overrides(fold)]


def fold_done(plan: CrossvalPlan, fold: int) -> bool:
    """The fold's training finished: its run wrote summary.json without a stop signal, and its newest complete
    checkpoint is at the summary's step (a run killed after that would have no newer summary)."""
    from distseg.core import checkpoint

    run = plan.run_dir(fold)
    try:
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    newest = checkpoint.newest_complete(run / "checkpoints")
    return (not summary.get("stopped_on_signal") and newest is not None
            and int(newest[1].get("step", -1)) == int(summary.get("step", -2)))


def run_folds(plan: CrossvalPlan, launcher: Sequence[str], train_script: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> int:
    """Train every pending fold of `plan`, one after another; returns 0, or the first failing launcher's status
    (4 = stopped on a signal after a checkpoint: rerun to resume). The plan is saved after every fold."""
    plan.save()
    for k in plan.folds:
        if fold_done(plan, k):
            logger.info("fold %d: done (%s), skipped", k, plan.run_dir(k))
            continue
        cmd = launcher_command(launcher, train_script, plan, k)
        logger.info("fold %d/%d: $ %s", k, plan.n_folds, " ".join(cmd))
        rc = subprocess.call(cmd, env=env, cwd=cwd)
        summary = plan.run_dir(k) / "summary.json"
        stopped = True
        if rc == 0 and summary.is_file():
            stopped = bool(json.loads(summary.read_text(encoding="utf-8")).get("stopped_on_signal"))
        plan.save()
        if rc != 0 or stopped:
            logger.error("fold %d: training exited %d%s; rerun the same command to resume it", k, rc,
                         " (stopped on a signal)" if rc == 0 else "")
            return rc or PREEMPTED
    return OK


# ------------------------------------------------------------------------------------------------ out of fold
@dataclass
class CrossvalResult:
    """What `finish` produced."""

    oof: EvaluationResult
    postprocessing_rules: dict[str, Any]
    postprocessed: EvaluationResult | None
    test: ModelEvaluation | None = None
    fold_models: dict[int, str] = field(default_factory=dict)


def fold_models(plan: CrossvalPlan) -> dict[int, Path]:
    """{fold: the checkpoint its run chose (best on its own validation fold, else the newest complete)}."""
    missing = [k for k in plan.folds if not fold_done(plan, k)]
    if missing:
        raise CrossvalError(f"{plan.path}: fold(s) {missing} not trained to completion; run launch/crossval.py "
                            "without --skip-train (or finish their job-array tasks) first")
    return {k: resolve_checkpoint(plan.run_dir(k)) for k in plan.folds}


def out_of_fold_cases(plan: CrossvalPlan, store: Store) -> dict[int, list[str]]:
    return {k: store.case_ids(folds=[k], labelled_only=True) for k in plan.folds}


def finish(plan: CrossvalPlan, settings: PredictSettings, test: bool = False) -> CrossvalResult:
    """Out-of-fold prediction of every training-pool case, the pooled evaluation, the postprocessing chosen on it,
    the ensemble file and summary.md; with `test`, then the ensemble on the test split."""
    store = Store.open(plan.store)
    tags = fold_models(plan)
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

    oof = evaluate_arrays(oof_items(), oof_dir, meta, total=len(all_cases))
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


def parse_folds(text: str) -> list[int]:
    """"0-4" / "0,2,3" / "1" -> sorted fold numbers."""
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"--folds {text!r}: expected numbers and ranges such as 0-4 or 0,2,3")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo:
            raise ValueError(f"--folds {text!r}: range {lo}-{hi} runs backwards")
        out.update(range(lo, hi + 1))
    return sorted(out)


def default_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: gloo stays on loopback
    return env
