"""Segment whole cases with a trained model (thin entry point; the work is in `distseg.inference`).

    python launch/predict.py --model RUN_DIR|CHECKPOINT_TAG|model.pt|model.onnx --input PATH... --output DIR
        [--fold K] [--cases ID,ID] [--overlap 0.5] [--tta mirror] [--window-batch 4] [--precision auto]
        [--postprocess] [--save-probabilities] [--device auto|cpu|cuda]
    deepspeed --num_gpus N launch/predict.py ...      (or torchrun): inputs are split across the ranks

Inputs: BraTS case folders in every naming the converter accepts (or folders of them), Zarr stores written by
`python -m preprocess` (all cases, `--fold`, `--cases`), 2D image files or folders (PNG/JPEG/TIFF). Raw inputs go
through the converter's own per-case functions (checks, crop, normalisation statistics), so a prediction from raw
NIfTI equals one from the store. Outputs (see distseg.inference.outputs): `<case>.nii.gz` in the input's geometry
and label convention + `<case>_overlay.png` for 3D; `<case>_mask.png` + `<case>_overlay.png` for 2D.

Exit status (`distseg.core.exit_codes`): 0 every case predicted; 2 bad input (the model, the output folder, no
inputs); 3 some cases or inputs failed, each named with the reason on stderr, the others predicted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from distseg.core import exit_codes
from distseg.data.location import is_remote, path_or_url

if TYPE_CHECKING:
    from distseg.inference.postprocess import StackPlace

logger = logging.getLogger("launch.predict")

EXIT_OK, EXIT_BAD_INPUT, EXIT_SOME_FAILED = exit_codes.OK, exit_codes.USAGE, exit_codes.SOME_FAILED


@dataclass
class InputCase:
    """One case to predict: its id, where it comes from, and how to load it (deferred: only this rank loads)."""

    case_id: str
    source: str
    load: Callable[[], object]  # -> distseg.data.store.CaseArrays; raises on bad input
    place: StackPlace | None = None  # a subject's 2D slices are postprocessed together (`group_by_stack`)
    loose_slice: bool = False  # a raw 2D slice with a slice number but no patient folder: cannot be stacked


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/predict.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=path_or_url, nargs="+",
                   help="run folder (best checkpoint, else newest complete), checkpoint tag folder, exported "
                        "model.pt (model.yaml beside it), model.onnx, or a cross-validation folder (its fold models "
                        "as an ensemble); several = an ensemble (probabilities averaged window by window); local or "
                        "s3://bucket/prefix/...")
    p.add_argument("--input", required=True, nargs="+", type=path_or_url,
                   help="case folders, stores (local or s3://bucket/prefix/x.zarr), images or folders")
    p.add_argument("--output", required=True, type=path_or_url,
                   help="output folder (never an input folder), or s3://bucket/prefix: written to a local staging "
                        "folder ($DISTSEG_CACHE/outputs/...) and uploaded case by case")
    p.add_argument("--fold", type=int, action="append", default=None, help="store inputs: only cases of this fold")
    p.add_argument("--split", choices=["train", "test"], default=None,
                   help="store inputs: only the cross-validation pool (train) or the test split (default: every case)")
    p.add_argument("--cases", default="", help="only these case ids (comma-separated)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap fraction (default 0.5)")
    p.add_argument("--tta", choices=["none", "mirror"], default="none",
                   help="mirror: average over every combination of flips (8x the work in 3D, 4x in 2D)")
    p.add_argument("--window-batch", type=int, default=4, help="windows per forward call")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: the training precision on an accelerator, fp32 on CPU")
    p.add_argument("--postprocess", nargs="?", const=True, default=False, metavar="FILE",
                   help="apply the connected-component rule chosen on validation cases: the CV folder's (or the "
                        "run's) postprocessing.json, or FILE (e.g. the one `launch/evaluate.py "
                        "--choose-postprocessing` wrote)")
    p.add_argument("--save-probabilities", action="store_true", help="also write float16 probability maps (.npz)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ inputs
def discover_inputs(paths: list[str | Path], kind: str, channels: list[str], resize: int | None,
                    folds: list[int] | None, only: set[str], split: str | None = None
                    ) -> tuple[list[InputCase], list[str]]:
    """Every case under `paths` for a model of store `kind`; returns (cases sorted by id, problems)."""
    from distseg.data.layout import StoreError
    from distseg.data.store import Store
    from distseg.inference.postprocess import stack_place
    from preprocess.discover import IMAGE_EXTS, SourceCase, discover_brats, discover_images2d, slice_index_of

    cases: dict[str, InputCase] = {}
    problems: list[str] = []

    def add(case: InputCase) -> None:
        if case.case_id in cases:
            problems.append(f"{case.source}: case id {case.case_id!r} also comes from {cases[case.case_id].source}; "
                            "expected each case once")
            return
        cases[case.case_id] = case

    def raw_brats(sc: SourceCase) -> Callable[[], object]:
        from preprocess.brats import prepare_brats_case

        return lambda: prepare_brats_case(sc)[0]

    def raw_2d(sc: SourceCase) -> Callable[[], object]:
        from preprocess.images2d import prepare_2d_case

        return lambda: prepare_2d_case(sc, channels, resize)[0]

    def add_store(path: str | Path) -> None:
        try:
            store = Store.open(path)
        except StoreError as e:
            problems.append(str(e))
            return
        if store.kind != kind:
            problems.append(f"{path}: a {store.kind} store, but the model was trained on {kind} data")
            return
        for cid in store.case_ids(folds=folds, split=split):
            add(InputCase(cid, f"{path}:{cid}", lambda s=store, c=cid: s.case_arrays(c),
                          stack_place(cid, store.case_attrs(cid))))

    def place_2d(sc: SourceCase) -> StackPlace:
        # A patient is its folder (images/ and masks/ count as their parent), not the folder's name: two inputs
        # holding a P1 each are two patients.
        folder = sc.files["image"].parent
        if folder.name.lower() in ("images", "image", "imgs"):
            folder = folder.parent
        subject = str(folder.resolve()) if sc.subject else None
        return stack_place(sc.case_id, {"source_ndim": 2, "subject": subject, "slice_index": sc.slice_index})

    for path in paths:
        if is_remote(path):
            add_store(path)
        elif not path.exists():
            problems.append(f"{path}: no such file or folder; expected a case folder, a store or an image")
        elif (path / "zarr.json").is_file():
            add_store(path)
        elif kind == "brats3d":
            found = discover_brats(path if path.is_dir() else path.parent)
            if not found:
                problems.append(f"{path}: no BraTS case found; expected <case>_{{t1,t1ce,t2,flair}}.nii.gz files "
                                "(2018-2021) or BraTS-XXX-00000-000-{t1n,t1c,t2w,t2f}.nii.gz (2023+)")
            for sc in found:
                add(InputCase(sc.case_id, str(next(iter(sc.files.values())).parent), raw_brats(sc),
                              stack_place(sc.case_id, {})))
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_EXTS:
                problems.append(f"{path}: not an image; expected PNG, JPEG or TIFF")
                continue
            sc = SourceCase(path.stem, "images2d", {"image": path}, slice_index=slice_index_of(path.stem))
            add(InputCase(sc.case_id, str(path), raw_2d(sc), place_2d(sc), loose_slice=sc.slice_index is not None))
        else:
            found = [sc for sc in discover_images2d(path) if "image" in sc.files]
            if not found:
                problems.append(f"{path}: no image found; expected PNG, JPEG or TIFF files (masks are not inputs)")
            for sc in found:
                sc.problems = []  # an image without a mask is fine for prediction
                add(InputCase(sc.case_id, str(sc.files["image"]), raw_2d(sc), place_2d(sc),
                              loose_slice=sc.subject is None and sc.slice_index is not None))
    selected = [cases[k] for k in sorted(cases) if not only or k in only]
    missing = sorted(only - set(cases))
    if missing:
        problems.append(f"--cases: {', '.join(missing)} not found in the inputs")
    return selected, problems


# ------------------------------------------------------------------------------------------------ running
def rank_and_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from a launcher's environment (deepspeed, torchrun); (0, 1, 0) without one."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(arg: str, local_rank: int) -> str:
    import torch

    if arg == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if arg == "cuda":
        return f"cuda:{local_rank}"
    return arg


def _reason(e: Exception, item: InputCase) -> str:
    """One line naming the case or its file."""
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return reason if item.case_id in reason or item.source in reason else f"{item.source}: {reason}"


def predict_cases(predictor, groups: list[list[InputCase]], out_dir: Path, save_probabilities: bool,
                  rank: int = 0) -> Iterator[tuple[InputCase, object, object, str, list[Path]]]:
    """Predict and write each case, a stack at a time (`group_by_stack`: a subject's slices when the postprocessing
    has subject rules, else one case); yields (input, CaseArrays or None, Prediction or None, error text, the files
    written). A case that fails is left out of its stack; the others go on."""
    from distseg.inference.outputs import write_prediction

    total = sum(len(g) for g in groups)
    bar = tqdm(total=total, desc=f"predict[rank {rank}]", unit="case", dynamic_ncols=True, disable=not total)
    for group in groups:
        loaded = []
        for item in group:
            try:
                case = item.load()
                loaded.append((item, case, predictor.case_probabilities(case)))
            except Exception as e:  # one bad case never stops the others; the reason names the case or file
                yield item, None, None, _reason(e, item), []
            bar.update()
        if not loaded:
            continue
        try:
            preds = predictor.decode_stack([c for _, c, _ in loaded], [p for _, _, p in loaded],
                                           [item.place.position if item.place else None for item, _, _ in loaded])
        except Exception as e:  # the stack could not be postprocessed (e.g. two slices at one position)
            for item, _, _ in loaded:
                yield item, None, None, _reason(e, item), []
            continue
        for (item, case, _), pred in zip(loaded, preds, strict=True):
            try:
                written = write_prediction(out_dir, case, pred, predictor.io.kind, predictor.io.channels,
                                           save_probabilities)
            except Exception as e:
                yield item, None, None, _reason(e, item), []
                continue
            yield item, case, pred, "", list(written.values())
    bar.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world, local_rank = rank_and_world()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from distseg.inference.ensemble import load_models
    from distseg.inference.loading import ModelLoadError, read_postprocessing
    from distseg.inference.outputs import OutputError, check_output_dir
    from distseg.inference.predictor import Predictor

    device = pick_device(args.device, local_rank)
    sink = None
    if is_remote(args.output):
        from distseg.data.remote import UploadedFolder

        try:
            sink = UploadedFolder(str(args.output))
        except ValueError as e:
            logger.error("%s", e)
            return EXIT_BAD_INPUT
    out_dir = sink.local if sink is not None else args.output
    try:
        check_output_dir(out_dir, args.input)
        models = load_models(args.model, device)
        if isinstance(args.postprocess, str):
            models.postprocessing = read_postprocessing(Path(args.postprocess))
            if models.postprocessing is None:
                raise ModelLoadError(f"--postprocess {args.postprocess}: no such postprocessing file")
        predictor = Predictor(models, overlap=args.overlap, tta=args.tta == "mirror", window_batch=args.window_batch,
                              device=device, precision=args.precision, use_postprocessing=bool(args.postprocess))
    except (OutputError, ModelLoadError, ValueError) as e:
        logger.error("%s", e)
        return EXIT_BAD_INPUT
    io = models.io
    only = {c for c in args.cases.split(",") if c}
    cases, problems = discover_inputs(args.input, io.kind, io.channels, io.resize, args.fold, only, args.split)
    for problem in problems:
        logger.error("%s", problem)
    if not cases:
        logger.error("no case to predict in %s", " ".join(str(p) for p in args.input))
        return EXIT_BAD_INPUT
    from distseg.inference.postprocess import group_by_stack, stack_place

    stacked = predictor.postprocessing is not None and predictor.postprocessing.has_subject_rules()
    loose = [c.case_id for c in cases if c.loose_slice]
    if stacked and loose:
        logger.warning("%d slices (%s%s) lie directly in an --input folder or are single files: no patient folder "
                       "groups them, so the postprocessing's subject rules act on each slice alone; pass the folder "
                       "that holds the patient folders (LGG layout: kaggle_3m/, not kaggle_3m/<patient>/)",
                       len(loose), ", ".join(loose[:3]), ", ..." if len(loose) > 3 else "")
    groups = (group_by_stack(cases, lambda c: c.place or stack_place(c.case_id, {}), lambda c: c.case_id)
              if stacked else [[c] for c in cases])
    mine_groups = groups[rank::world]  # a subject's slices stay on one rank
    mine = [c for g in mine_groups for c in g]
    logger.info("model %s (%s, %s, window %s); %d cases, %d on this rank; device %s", models.describe(),
                models.members[0].config.model.name, io.mode, predictor.sw.window, len(cases), len(mine), device)
    t0 = time.perf_counter()
    failed = 0
    for item, _, _, error, written in predict_cases(predictor, mine_groups, out_dir, args.save_probabilities, rank):
        if not error and sink is not None:
            try:  # this case's files only (the other ranks upload theirs); no walk over the whole folder per case
                sink.sync(files=written)
            except OSError as e:
                error = f"{e} (its files are in {out_dir})"
        if error:
            failed += 1
            logger.error("FAILED %s: %s", item.case_id, error)
    seconds = time.perf_counter() - t0
    logger.info("rank %d: %d cases predicted, %d failed in %.1f s -> %s", rank, len(mine) - failed, failed, seconds,
                args.output)
    return EXIT_SOME_FAILED if failed or problems else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
