"""Evaluate segmentations: predictions vs ground truth per case and region, or compare evaluations side by side.

    python launch/evaluate.py --pred DIR --gt DIR --output DIR [--hd95-one-empty 373.13] [--workers N]
    python launch/evaluate.py --model MODEL [MODEL ...] --store STORE [--fold K ... | --split test] --output DIR
        [--choose-postprocessing | --postprocess] [--overlap 0.5] [--tta mirror] [--window-batch 4] [--device auto]
    python launch/evaluate.py compare EVAL_DIR... [--output FILE.md]

--model: a run folder, checkpoint tag, model.pt / model.onnx, a cross-validation folder (its fold models as an
ensemble), or several of them (an ensemble). Predicts the store's labelled cases with the sliding window -- the
given folds (default: the run's validation folds), or with --split test the test split set aside at preprocessing
-- writes each prediction (NIfTI / mask PNG + overlay) under DIR/predictions, scores them in the source grid and
logs the summary to the run's TensorBoard. Every report says its role: "validation" (fold cases: they chose the
best checkpoint) or "test" (no choice saw them). --choose-postprocessing chooses the connected-component rule on
these (validation) cases and writes DIR/postprocessing.json (refused with --split test; nothing is written beside
the model); --postprocess applies the rule the model or CV folder carries and scores it under DIR/postprocessed.

--pred: files written by the predictor (3D `<case_id>.nii.gz`, 2D `<case_id>_mask.png`); --gt: BraTS case folders
(any release naming), `<case_id>[_seg].nii.gz` label files, or 2D masks (see `preprocess/label_files.py`). Writes
metrics.parquet/.csv, summary.md/.json, boxplot_<metric>.png and evaluation.json to --output (never into --pred or
--gt) and prints summary.md. Every ground-truth case counts: one without a prediction file, or whose files cannot
be scored (unreadable, wrong grid, unknown label values), is a failed row per region scored by the BraTS convention
(Dice 0, HD95 --hd95-one-empty, lesion-wise Dice 0 / HD95 374) and included in the means. Exit status: 0 every
case scored, 3 some cases failed or had no prediction (each a row with its reason; the others are scored), 2 bad
usage (missing folder, nothing paired, output inside an input).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from distseg.core.exit_codes import OK, SOME_FAILED, USAGE
from distseg.core.fileio import atomic_write
from distseg.data.location import is_remote, path_or_url
from distseg.evaluation import BRATS_HD95_ONE_EMPTY, EvaluationMeta, compare, evaluate_arrays
from preprocess.label_files import KIND_REGIONS, PairingError, PairLoader, pair_label_files

if TYPE_CHECKING:
    from distseg.inference.ensemble import ModelSet

logger = logging.getLogger("launch.evaluate")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", type=Path, help="folder of prediction files")
    parser.add_argument("--gt", type=Path, help="folder of ground truth (BraTS cases, labels, masks)")
    parser.add_argument("--model", type=path_or_url, nargs="+",
                        help="run folder, checkpoint tag, model.pt, model.onnx or CV folder, local or "
                             "s3://bucket/prefix/...; several = an ensemble")
    parser.add_argument("--store", type=path_or_url,
                        help="with --model: the Zarr store holding the cases (local or s3://bucket/prefix/x.zarr)")
    parser.add_argument("--fold", type=int, action="append", default=None,
                        help="with --model: fold(s) to evaluate (default: the run's data.val_folds)")
    parser.add_argument("--overlap", type=float, default=0.5, help="with --model: sliding-window overlap")
    parser.add_argument("--tta", choices=["none", "mirror"], default="none", help="with --model: mirror TTA")
    parser.add_argument("--window-batch", type=int, default=4, help="with --model: windows per forward")
    parser.add_argument("--device", default="auto", help="with --model: auto, cpu or cuda")
    parser.add_argument("--split", choices=["train", "test"], default="train",
                        help="with --model: train (default: the cross-validation pool, with --fold) or test (the "
                             "test split set aside at preprocessing; reported as test)")
    parser.add_argument("--choose-postprocessing", action="store_true",
                        help="with --model: choose the connected-component rule on these validation cases and write "
                             "it to OUTPUT/postprocessing.json (refused with --split test)")
    parser.add_argument("--postprocess", nargs="?", const=True, default=False, metavar="FILE",
                        help="with --model: also score a postprocessing rule chosen on validation cases: the one the "
                             "CV folder (or run) carries, or FILE (a postprocessing.json)")
    parser.add_argument("--output", type=path_or_url, required=True,
                        help="folder for the evaluation outputs, or s3://bucket/prefix (written to a local staging "
                             "folder, $DISTSEG_CACHE/outputs/..., then uploaded)")
    parser.add_argument("--hd95-one-empty", type=float, default=BRATS_HD95_ONE_EMPTY,
                        help="HD95 when exactly one of prediction and ground truth is empty, and of a failed or "
                             "missing case (default: BraTS 373.13)")
    parser.add_argument("--workers", type=int, default=1, help="processes that read and score cases (default 1)")
    return parser.parse_args(argv)


def parse_compare_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="evaluate.py compare",
                                     description="Print several evaluations side by side as a Markdown table.")
    parser.add_argument("eval_dirs", type=Path, nargs="+", help="output folders of earlier evaluations")
    parser.add_argument("--output", type=Path, help="also write the table to this Markdown file")
    return parser.parse_args(argv)


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def run_compare(argv: list[str]) -> int:
    args = parse_compare_args(argv)
    try:
        table = compare(args.eval_dirs)
        if args.output is not None:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(args.output, lambda tmp: tmp.write_text(table, encoding="utf-8"))
    except (ValueError, OSError) as e:
        logger.error("%s", e)
        return USAGE
    sys.stdout.write(table)
    return OK


def run_model(args: argparse.Namespace) -> int:
    """--model RUN --store STORE [--fold K]: predict the fold's cases, score them, choose the postprocessing."""
    import torch

    from distseg.data.layout import StoreError
    from distseg.data.store import Store
    from distseg.evaluation.model import PredictSettings, evaluate_model
    from distseg.inference.ensemble import load_models
    from distseg.inference.loading import ModelLoadError, read_postprocessing
    from distseg.inference.outputs import OutputError, check_output_dir

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.split == "test" and args.choose_postprocessing:
        logger.error("--choose-postprocessing with --split test is refused: a choice made on the test split makes "
                     "its report optimistic; choose on validation folds (or use a CV folder's choice: --postprocess)")
        return USAGE
    if args.split == "test" and args.fold:
        logger.error("--fold selects cross-validation folds; the test split has none (drop --fold)")
        return USAGE
    try:
        check_output_dir(args.output, [args.store])
        models = load_models(args.model, device)
        store = Store.open(args.store)
        if isinstance(args.postprocess, str):
            models.postprocessing = read_postprocessing(Path(args.postprocess))
            if models.postprocessing is None:
                raise ModelLoadError(f"--postprocess {args.postprocess}: no such postprocessing file")
    except (OutputError, ModelLoadError, StoreError) as e:
        logger.error("%s", e)
        return USAGE
    if args.postprocess and models.postprocessing is None:
        logger.error("%s: --postprocess asked for, but it carries no postprocessing.json; choose one on validation "
                     "cases (--choose-postprocessing, or launch/crossval.py)", models.describe())
        return USAGE
    if args.split == "test":
        folds, what = None, "test split"
        cases = store.case_ids(labelled_only=True, split="test")
    else:
        folds, problem = held_out_folds(models, args.fold)
        if problem:
            logger.error("%s", problem)
            return USAGE
        what = f"folds {folds}"
        cases = store.case_ids(folds=folds, labelled_only=True)
    _warn_if_another_store(models, args.store)
    if not cases:
        logger.error("%s: no labelled case in the %s; expected %s", args.store, what,
                     "a store preprocessed with --test-subjects/--test-fraction" if args.split == "test"
                     else "the folds the model was validated on")
        return USAGE
    settings = PredictSettings(overlap=args.overlap, tta=args.tta == "mirror", window_batch=args.window_batch,
                               device=device)
    try:
        evaluation = evaluate_model(models, store, cases, args.output, settings,
                                    role="test" if args.split == "test" else "validation", what=what,
                                    choose_pp=args.choose_postprocessing, folds=folds,
                                    apply_pp=models.postprocessing if args.postprocess else None)
    except (ValueError, OSError) as e:
        logger.error("%s", e)
        return USAGE
    sys.stdout.write(evaluation.result.markdown)
    if evaluation.postprocessed is not None:
        rules = ", ".join(f"{k}: {r.describe()}" for k, r in evaluation.postprocessing.rules.items())
        sys.stdout.write(f"\n## With the chosen postprocessing ({rules})\n\n{evaluation.postprocessed.markdown}")
    return SOME_FAILED if evaluation.result.n_failed else OK


def held_out_folds(models: ModelSet, asked: list[int] | None) -> tuple[list[int], str | None]:
    """The folds every member of `models` held out (its `data.val_folds`): the only non-test cases it can be scored
    on without scoring cases it trained on. `asked` (--fold): checked against them. Returns (folds, problem)."""
    held = [set(m.config.data.val_folds) for m in models.members]
    common = sorted(set.intersection(*held)) if held else []
    if asked:
        for fold in asked:
            trained = [m.source for m, h in zip(models.members, held, strict=True) if fold not in h]
            if trained:
                return [], (f"--fold {fold}: {', '.join(trained)} trained on it (validation folds "
                            f"{sorted(held[0]) if len(held) == 1 else 'differ per member'}); scoring cases a model "
                            "trained on is not a validation number. Use the folds it held out, or --split test")
        return list(asked), None
    if not common:
        return [], (f"{models.describe()}: no fold is held out by every member (fold models of a cross-validation "
                    "each trained on the others' folds; a model trained without validation holds out none): its "
                    "out-of-fold scores are the CV folder's oof/ report (launch/crossval.py), its unbiased ones "
                    "--split test")
    return common, None


def _warn_if_another_store(models: ModelSet, store: str) -> None:
    """Folds and splits are the store's: scoring a model on another store's fold or test split may score cases it
    trained on (a copy or a re-preprocessing can move cases between folds)."""
    def norm(p: str) -> str:
        return str(p).rstrip("/") if is_remote(str(p)) else str(Path(p).expanduser().resolve())

    trained = {norm(m.config.data.store) for m in models.members if m.config.data.store}
    if trained and norm(store) not in trained:
        logger.warning("%s was trained on %s, not on --store %s: its folds and test split are that store's, so make "
                       "sure this store assigns cases the same way (same preprocessing, same --test-subjects)",
                       models.describe(), ", ".join(sorted(trained)), store)


def run_files(argv: list[str]) -> int:
    args = parse_args(argv)
    if not is_remote(args.output):
        return _run(args)
    from distseg.data.remote import RemoteWriteError, UploadedFolder

    try:
        sink = UploadedFolder(str(args.output))
    except ValueError as e:
        logger.error("%s", e)
        return USAGE
    url, args.output = args.output, sink.local
    rc = _run(args)
    try:
        n = sink.sync()
    except RemoteWriteError as e:
        logger.error("%s; the evaluation is in %s", e, sink.local)
        return USAGE
    logger.info("uploaded %d files to %s (local copy: %s)", n, url, sink.local)
    return rc


def _run(args: argparse.Namespace) -> int:
    if args.model is not None:
        if args.pred is not None or args.gt is not None or args.store is None:
            logger.error("--model needs --store (and no --pred/--gt): evaluate.py --model RUN --store STORE "
                         "[--fold K] --output DIR")
            return USAGE
        return run_model(args)
    if args.pred is None or args.gt is None:
        logger.error("expected either --pred DIR --gt DIR or --model RUN --store STORE")
        return USAGE
    if args.workers < 1:
        logger.error("--workers %d: expected an integer >= 1", args.workers)
        return USAGE
    for flag, folder in (("--pred", args.pred), ("--gt", args.gt)):
        if folder.exists() and _inside(args.output, folder):
            logger.error("--output %s is inside %s %s; expected a folder outside the inputs (outputs never go "
                         "into them)", args.output, flag, folder)
            return USAGE
    try:
        pairing = pair_label_files(args.pred, args.gt)
        args.output.mkdir(parents=True, exist_ok=True)
    except (PairingError, OSError) as e:
        logger.error("%s", e)
        return USAGE
    meta = EvaluationMeta(
        kind=pairing.kind, regions=KIND_REGIONS[pairing.kind],
        sources={"pred": str(args.pred.resolve()), "gt": str(args.gt.resolve())},
        hd95_unit="mm" if pairing.kind == "brats3d" else "px", hd95_one_empty=args.hd95_one_empty,
        notes={"no_prediction": pairing.no_prediction, "no_ground_truth": pairing.no_ground_truth},
    )
    items = [*pairing.failures, *(PairLoader(pairing.kind, case_id, pred, gt) for case_id, pred, gt in pairing.pairs)]
    items.sort(key=lambda item: item.case_id)
    try:
        result = evaluate_arrays(items, args.output, meta, workers=args.workers, total=len(items))
    except OSError as e:
        logger.error("writing the evaluation to %s failed: %s", args.output, e)
        return USAGE
    sys.stdout.write(result.markdown)
    return SOME_FAILED if result.n_failed else OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if argv[:1] == ["compare"]:
        return run_compare(argv[1:])
    return run_files(argv)


if __name__ == "__main__":
    sys.exit(main())
