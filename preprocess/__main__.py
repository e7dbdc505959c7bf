"""`python -m preprocess {brats,images2d,synth} ...` (also the `distseg-preprocess` console script).

Exit status: 0 all cases ok (or skipped as unchanged), 3 some cases failed but every good case was written,
2 bad usage (bad arguments, missing --src, nothing to convert).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from preprocess.writer import path_or_url

logger = logging.getLogger("preprocess")


def _common(p: argparse.ArgumentParser, default_name: str) -> None:
    p.add_argument("--src", required=True, type=Path, help="folder with the source cases (searched recursively)")
    p.add_argument("--dst", required=True, type=path_or_url,
                   help="output folder on shared storage (made absolute), or s3://bucket/prefix")
    p.add_argument("--name", default=default_name,
                   help=f"dataset name: writes DST/NAME.zarr + DST/NAME.manifest.parquet (default {default_name})")
    p.add_argument("--folds", type=int, default=5,
                   help="K for the K-fold assignment sha256(subject) mod K (sha256(case_id) for cases without one)")
    p.add_argument("--fold-assignment", choices=["hash", "balanced"], default="hash",
                   help="hash (default): fold = sha256(subject) mod K, stable as the dataset grows; balanced: "
                        "subjects sorted by hash and dealt round-robin, so fold sizes differ by at most one (small "
                        "datasets; adding subjects moves others)")
    p.add_argument("--test-subjects", type=_id_list, default=None, metavar="ID,ID,...",
                   help="set these subjects (or case ids) aside as the test split: never trained, validated or "
                        "chosen on (fold -1, split 'test')")
    p.add_argument("--test-fraction", type=_fraction, default=0.0, metavar="F",
                   help="also set aside each subject with int(sha256('test:' + subject)[:8], 16) / 2**32 < F "
                        "(deterministic per subject; default 0)")
    p.add_argument("--subject-regex", type=_subject_regex, default=None, metavar="REGEX",
                   help="subject (patient) of each case = group 1 of REGEX searched in the case id, e.g. "
                        "'^(TCGA_[A-Z0-9]+_[A-Z0-9]+)_'; default: 2D: the patient folder holding the slice, BraTS "
                        "2023+: the id without its -NNN timepoint, BraTS 2018-2021: the case id")
    p.add_argument("--address", default=None, help="Ray cluster address; default: RAY_ADDRESS if set, else local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for local Ray (default: all)")
    p.add_argument("--serial", action="store_true", help="convert in this process without Ray (debugging)")
    p.add_argument("--cases-per-task", type=_positive_int, default=None, metavar="N",
                   help="cases converted by one Ray task (default: cases / (64 x cluster CPUs), at least 1, at most "
                        "64: one per task for BraTS-sized runs; batches for 100 000 2D slices of ~20 ms each, "
                        "where Ray's per-task cost would otherwise be a large share)")
    p.add_argument("--force", action="store_true", help="reconvert cases even when their sources are unchanged")
    p.add_argument("--codec", choices=["lz4", "zstd"], default="lz4",
                   help="Blosc inner codec: lz4 (default; fastest patch reads, ~0.97x the .nii.gz size) or zstd "
                        "(~0.82x the .nii.gz size, ~1.6x slower patch reads); numbers in the README")
    p.add_argument("--layout", choices=["sharded", "chunked"], default="sharded",
                   help="sharded (default): one object per case and array (Zarr v3 sharding); chunked: one file per "
                        "chunk, as stores written before it (both are read)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return value


def _subject_regex(text: str) -> re.Pattern[str]:
    try:
        pattern = re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression ({e})") from None
    if pattern.groups != 1:
        raise argparse.ArgumentTypeError(f"{text!r} has {pattern.groups} groups; expected exactly one (the subject)")
    return pattern


def _id_list(text: str) -> list[str]:
    ids = [t.strip() for t in text.split(",") if t.strip()]
    if not ids:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated subject or case ids")
    return ids


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a fraction in [0, 1)")
    return value


def _channel_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(re.fullmatch(r"[A-Za-z0-9_.-]+", n) for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected distinct comma-separated names of letters, digits, '_', '.' or '-' "
            "(e.g. pre,flair,post)"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("brats", help="BraTS NIfTI (2018-2021 and 2023+ namings) -> Zarr store + manifest")
    _common(b, "brats")
    i = sub.add_parser("images2d", help="2D image/mask folders (PNG/JPEG/TIFF) -> Zarr store + manifest")
    _common(i, "images2d")
    i.add_argument("--size", type=int, default=None, help="resize to SxS (image bilinear, mask nearest)")
    i.add_argument("--channels", choices=["auto", "gray", "rgb"], default="auto",
                   help="gray: 1 channel; rgb: 3 channels (alpha dropped, gray replicated); auto: rgb if any of the "
                        "first images has distinct colour channels, else gray (decided once for the whole dataset)")
    i.add_argument("--channel-names", type=_channel_names, default=None, metavar="A,B,C",
                   help="names stored for the channels instead of gray / r,g,b, e.g. pre,flair,post for the LGG "
                        "TIFFs (pre-contrast, FLAIR, post-contrast); the count must match the channels")
    s = sub.add_parser("synth", help="write a small synthetic dataset (BraTS 2021 NIfTI layout or 2D PNG folders)")
    s.add_argument("--kind", choices=["brats", "images2d"], required=True)
    s.add_argument("--n", type=int, required=True, help="number of cases")
    s.add_argument("--dst", type=Path, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shape", type=lambda t: tuple(int(v) for v in t.lower().split("x")), default=None,
                   help="BraTS: XxYxZ (default 96x96x64); images2d: HxW (default 128x128)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "synth":
        from preprocess.synth import write_synth

        n = write_synth(args.kind, args.n, args.dst.resolve(), args.seed, args.shape)
        logger.info("wrote %d synthetic %s cases under %s", n, args.kind, args.dst.resolve())
        return 0
    if not args.src.is_dir():
        parser.error(f"--src {args.src}: not a directory; expected the folder holding the source cases")
    if args.folds < 1:
        parser.error(f"--folds {args.folds}: expected an integer >= 1")
    if args.command == "images2d" and args.size is not None and args.size < 1:
        parser.error(f"--size {args.size}: expected a positive integer")
    from preprocess.pipeline import run_dataset

    return run_dataset(args)


if __name__ == "__main__":
    raise SystemExit(main())
