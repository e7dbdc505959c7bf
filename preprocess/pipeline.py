"""One preprocessing run: discover -> init store -> clean leftovers -> convert every case -> manifest -> exit status."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

from distseg.data.index import remove_index, write_index
from distseg.data.layout import TEST_FOLD, StoreError
from distseg.data.location import is_remote
from preprocess import bucket
from preprocess.common import BALANCED_ASSIGNMENT, FOLD_ASSIGNMENT, TEST_ASSIGNMENT, assign_folds
from preprocess.discover import apply_subject_regex
from preprocess.runner import EXIT_USAGE, init_ray, run_cases, summarize, write_manifest
from preprocess.writer import Layout, clean_temp, init_store, path_or_url, retire_cases

logger = logging.getLogger(__name__)


def run_dataset(args: argparse.Namespace) -> int:
    """Run `brats` or `images2d` for parsed CLI args; returns the exit status."""
    src = args.src.resolve()
    dst = path_or_url(str(args.dst))  # an absolute path (workers on other nodes must see the same) or s3:// URL
    layout = Layout() if args.codec == "lz4" else Layout(cname="zstd", clevel=1)
    layout = dataclasses.replace(layout, sharded=getattr(args, "layout", "sharded") == "sharded")
    if args.command == "brats":
        from preprocess.brats import brats_root_attrs, convert_brats_case
        from preprocess.discover import discover_brats

        cases = discover_brats(src)
        if not cases:
            logger.error(
                "no BraTS cases found under %s: expected files named like <case>_{t1,t1ce,t2,flair,seg}.nii.gz "
                "(2018-2021) or BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz (2023+)", src,
            )
            return EXIT_USAGE
        root_attrs = brats_root_attrs()
        subject_rule = "BraTS 2023+: case id without its -NNN timepoint; 2018-2021: the case id"
        fn: Any = convert_brats_case
        extra: tuple[Any, ...] = ()
    else:
        from preprocess.discover import discover_images2d
        from preprocess.images2d import convert_2d_case, decide_channels, images2d_root_attrs

        cases = discover_images2d(src)
        if not cases:
            logger.error("no images found under %s: expected images/ + masks/ folders or X.png + X_mask.png pairs "
                         "(PNG, JPEG or TIFF)", src)
            return EXIT_USAGE
        channels = decide_channels(cases, args.channels)
        if args.channel_names is not None:
            if len(args.channel_names) != len(channels):
                logger.error("--channel-names %s: %d names but the images are converted with %d channel(s) (%s); "
                             "expected %d names", ",".join(args.channel_names), len(args.channel_names),
                             len(channels), ",".join(channels), len(channels))
                return EXIT_USAGE
            channels = list(args.channel_names)
        root_attrs = images2d_root_attrs(channels, args.size)
        subject_rule = "the folder holding the slice (images/ + masks/: their parent); none at the --src root"
        fn = convert_2d_case
        extra = (channels, args.size)
    if args.subject_regex is not None:
        apply_subject_regex(cases, args.subject_regex)
        subject_rule = f"group 1 of --subject-regex {args.subject_regex.pattern!r} searched in the case id"
    elif args.command == "images2d":
        loose = [c.case_id for c in cases if c.subject is None and c.slice_index is not None]
        if loose:  # slices of one patient in different folds (or in training and the test split) leak
            logger.warning("%d images at the root of %s carry slice numbers (%s%s) but no patient folder: each is its "
                           "own subject, so one patient's slices can land in different folds or in the test split. "
                           "Put each patient's slices in a folder of its own, or pass --subject-regex (e.g. "
                           "'^(.+)_\\d+$' for <patient>_<slice>)", len(loose), src, ", ".join(loose[:3]),
                           ", ..." if len(loose) > 3 else "")
    test_subjects = set(args.test_subjects or [])
    folds = assign_folds(cases, args.folds, test_subjects, args.test_fraction, args.fold_assignment == "balanced")
    test = sorted({c.subject or c.case_id for c in cases if folds[c.case_id] == TEST_FOLD})
    unknown = sorted(test_subjects - {c.subject or c.case_id for c in cases} - {c.case_id for c in cases})
    if unknown:
        logger.error("--test-subjects: %s match no discovered case or subject under %s; expected subject or case "
                     "ids such as %s", ", ".join(unknown), src, ", ".join(sorted(c.case_id for c in cases)[:3]))
        return EXIT_USAGE
    root_attrs.update(folds=args.folds, subject_rule=subject_rule, source_root=str(src),
                      fold_assignment=BALANCED_ASSIGNMENT if args.fold_assignment == "balanced" else FOLD_ASSIGNMENT,
                      test_split={"subjects": test, "listed": sorted(test_subjects),
                                  "fraction": args.test_fraction, "rule": TEST_ASSIGNMENT})
    remote = is_remote(dst)
    store_path = f"{dst}/{args.name}.zarr" if remote else dst / f"{args.name}.zarr"
    manifest = f"{dst}/{args.name}.manifest.parquet" if remote else dst / f"{args.name}.manifest.parquet"
    try:
        init_store(store_path, root_attrs)
    except StoreError as e:
        logger.error("%s", e)
        return EXIT_USAGE
    (bucket.remove_index if remote else remove_index)(store_path)  # cases are about to change: readers list them
    # until the new index is written
    clean_temp(store_path)
    jobs = [(c.case_id, (c, store_path, folds[c.case_id], layout, *extra, args.force)) for c in cases]
    logger.info("%d %s cases under %s -> %s (test split: %d subjects%s)", len(cases), args.command, src, store_path,
                len(test), f": {', '.join(test)}" if 0 < len(test) <= 10 else "")
    if not args.serial:
        init_ray(args.address, args.num_cpus)
    rows = run_cases(fn, jobs, use_ray=not args.serial, desc=args.command,
                     batch=getattr(args, "cases_per_task", None))
    by_id = {c.case_id: c for c in cases}
    for row in rows:  # failed rows carry no attrs: take subject and slice index from discovery
        case = by_id.get(row["case_id"])
        if case is not None:
            row.update(subject=case.subject, slice_index=case.slice_index)
            row.update(fold=folds[case.case_id], split="test" if folds[case.case_id] == TEST_FOLD else "train")
    write_manifest(manifest, rows)
    retire_cases(store_path, {r["case_id"] for r in rows if r["status"] in ("ok", "skipped")})
    (bucket.write_index if remote else write_index)(store_path)
    return summarize(rows, store_path, manifest)

