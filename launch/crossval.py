"""K-fold cross-validation in one command (thin entry point; the work is in `distseg.evaluation.crossval`).

    python launch/crossval.py --config brats_budget_cv [--folds 0-4] [--ranks 2] [--output DIR]
        [--test] [key=value ...]

1. trains one model per fold with the real launcher (`deepspeed --num_gpus RANKS launch/train.py --config C
   data.val_folds=[k] ...`), one fold after another; each fold's "best" checkpoint is chosen on its own validation
   fold only. A rerun skips finished folds and resumes the others from their newest complete checkpoint.
2. predicts every training-pool case with the fold model that never trained on it (out of fold) and scores them
   together (role "validation");
3. chooses the postprocessing (per-region thresholds, then connected components) on the pooled out-of-fold
   predictions (nnU-Net's rule: each kept only when the mean Dice rises and no region drops) and writes
   `postprocessing.json` and `ensemble.json`, so the folder is a model: `launch/predict.py --model DIR --postprocess`
   and `launch/evaluate.py --model DIR` use the fold ensemble (probabilities averaged window by window);
4. with --test, then evaluates the ensemble (+ postprocessing) on the test split set aside at preprocessing
   (`--test-subjects` / `--test-fraction`): the number to report. No choice ever reads the test split.

Several configurations (nnU-Net's `find_best_configuration`):

    python launch/crossval.py choose CV_DIR_A CV_DIR_B ... --output DIR [--max-members N]

scores each CV folder and each ensemble of them on the same out-of-fold cases, keeps the best mean Dice, chooses
its postprocessing on its out-of-fold predictions and writes DIR as a model (ensemble.json, postprocessing.json,
choice.json). The test split is not read; evaluate DIR on it afterwards (`launch/evaluate.py --model DIR --split
test --postprocess`).

Cluster: `--only-train --folds K` trains one fold (one job-array task each: cluster/slurm_crossval.sbatch), then
`--skip-train` (a job depending on the array) does steps 2-4. `--launcher "deepspeed --hostfile H ..."` replaces
the local launcher. Extra key=value arguments go to every fold's training (e.g. train.max_minutes=5).

Exit status: 0 done; 2 bad usage (config, store, folds); 3 some out-of-fold or test cases failed to predict (each
a failed row, counted); 4 a fold stopped on a signal after a checkpoint (rerun to resume); other: a fold's
training failed with that status.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from distseg.core.exit_codes import OK, SOME_FAILED, USAGE

logger = logging.getLogger("launch.crossval")
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/crossval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="experiment YAML trained on every fold (a path, or the name of a shipped config)")
    p.add_argument("--folds", default=None, help="folds to run, e.g. 0-4 or 0,2 (default: every fold of the store)")
    p.add_argument("--output", type=Path, default=None,
                   help="CV folder (default: <run.output_root>/crossval/<run.name>)")
    p.add_argument("--ranks", type=int, default=2, help="local launcher: deepspeed --num_gpus RANKS (default 2)")
    p.add_argument("--launcher", default=None,
                   help="the launcher command instead of the local one, e.g. 'deepspeed --hostfile H --num_nodes 2'")
    p.add_argument("--only-train", action="store_true", help="train the folds, then stop (a job-array task)")
    p.add_argument("--plan-only", action="store_true",
                   help="check the CV folder against this config, overrides and store, record them, then stop (what "
                        "a job-array task does before its own launcher trains the fold)")
    p.add_argument("--skip-train", action="store_true",
                   help="every fold is trained: predict out of fold, choose, write the ensemble")
    p.add_argument("--test", action="store_true", help="finally evaluate the ensemble on the store's test split")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap of the predictions")
    p.add_argument("--tta", choices=["none", "mirror"], default="none", help="mirror TTA of the predictions")
    p.add_argument("--window-batch", type=int, default=4, help="windows per forward call")
    p.add_argument("--device", default="auto", help="prediction device: auto, cpu or cuda")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every fold's training")
    return p.parse_args(argv)


def _deepspeed() -> str:
    beside = Path(sys.executable).with_name("deepspeed")
    return str(beside) if beside.exists() else "deepspeed"


def run_choose(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="launch/crossval.py choose",
                                description="Choose the best configuration or ensemble on out-of-fold predictions.")
    p.add_argument("cv_dirs", type=Path, nargs="+", help="CV folders of launch/crossval.py (same store)")
    p.add_argument("--output", type=Path, required=True, help="folder for the chosen model (ensemble + choices)")
    p.add_argument("--max-members", type=int, default=None, help="largest ensemble tried (default: all folders)")
    args = p.parse_args(argv)
    from distseg.evaluation.choose import choose_configuration
    from distseg.evaluation.crossval import CrossvalError
    from distseg.inference.loading import ModelLoadError

    try:
        choice = choose_configuration(args.cv_dirs, args.output, args.max_members)
    except (CrossvalError, ModelLoadError) as e:
        logger.error("%s", e)
        return USAGE
    lines = ["| candidate | mean out-of-fold Dice | " + " | ".join(k for k in next(iter(choice.scores.values()))
                                                             if k != "mean") + " |"]
    lines.append("|" + " --- |" * (len(next(iter(choice.scores.values()))) + 1))
    for name, s in sorted(choice.scores.items(), key=lambda kv: -kv[1]["mean"]):
        lines.append(f"| {name} | {s['mean']:.4f} | " + " | ".join(f"{v:.4f}" for k, v in s.items() if k != "mean")
                     + " |")
    sys.stdout.write("\n".join(lines) + f"\n\nchosen: {' + '.join(choice.winner)} -> {choice.folder}\n")
    return OK


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "choose":
        return run_choose(argv[1:])
    args = parse_args(argv)
    import torch

    from distseg.config import ConfigError
    from distseg.data.layout import StoreError
    from distseg.evaluation.crossval import (
        CrossvalError,
        CrossvalPlan,
        default_env,
        finish,
        parse_folds,
        run_folds,
    )
    from distseg.evaluation.model import PredictSettings
    from distseg.inference.loading import ModelLoadError

    if args.only_train and args.skip_train:
        logger.error("--only-train and --skip-train exclude each other")
        return USAGE
    try:
        folds = parse_folds(args.folds) if args.folds else None
        plan = CrossvalPlan.create(args.config, args.overrides, folds, args.output)
    except (ValueError, ConfigError, StoreError, CrossvalError) as e:
        logger.error("%s", e)
        return USAGE
    logger.info("cross-validation folder %s: folds %s of %d", plan.folder, plan.folds, plan.n_folds)
    if args.plan_only:
        plan.save()
        return OK
    if not args.skip_train:
        launcher = shlex.split(args.launcher) if args.launcher else [_deepspeed(), "--num_gpus", str(args.ranks)]
        rc = run_folds(plan, launcher, REPO / "launch" / "train.py", env=default_env(), cwd=Path.cwd())
        if rc != 0:
            return rc
        if args.only_train:
            return OK
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = PredictSettings(overlap=args.overlap, tta=args.tta == "mirror", window_batch=args.window_batch,
                               device=device)
    try:
        if args.skip_train:
            plan.save()
        result = finish(plan, settings, test=args.test)
    except (CrossvalError, ModelLoadError, StoreError) as e:
        logger.error("%s", e)
        return USAGE
    sys.stdout.write((plan.path / "summary.md").read_text(encoding="utf-8"))
    failed = result.oof.meta.n_failed + (result.test.result.meta.n_failed if result.test else 0)
    return SOME_FAILED if failed else OK


if __name__ == "__main__":
    raise SystemExit(main())
