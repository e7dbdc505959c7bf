"""Find source cases: BraTS NIfTI in every release naming, and 2D image/mask pairs.

BraTS namings (`.nii` or `.nii.gz`, any folder depth, grouped by the case id in the file name):
- 2018-2021: `<case>_{t1,t1ce,t2,flair,seg}` e.g. `Brats18_2013_3_1_t1ce`, `BraTS20_Training_001_flair`,
  `BraTS2021_00000_seg`; labels {0,1,2,4} ("brats2018" convention).
- 2023+: `BraTS-<COHORT>-<5 digits>-<3 digits>-{t1n,t1c,t2w,t2f,seg}` for GLI/MEN/MET/PED/SSA/...;
  labels {0,1,2,3} ("brats2023").
Modalities are mapped onto one channel order: t1 (=t1n), t1ce (=t1c), t2 (=t2w), flair (=t2f).

Every case also gets a **subject** (the patient; folds are assigned per subject so no patient is in both training and
validation) and, for 2D slices, a **slice index**:
- BraTS 2023+: the id without its timepoint, `BraTS-GLI-00001-001` -> `BraTS-GLI-00001`; 2018-2021: the case id.
- 2D: the folder holding the slice (an `images/`/`masks/` pair counts as its parent folder), None when that is the
  --src root; slice index = the trailing `_<n>` of the file stem (`TCGA_CS_4941_19960909_12` -> 12), else None.
- `--subject-regex` (one group, searched in the case id) overrides both (`apply_subject_regex`).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

MODALITIES = ("t1", "t1ce", "t2", "flair")

_OLD_RE = re.compile(r"^(?P<case>.+)_(?P<mod>t1|t1ce|t2|flair|seg)\.nii(?:\.gz)?$", re.IGNORECASE)
_NEW_RE = re.compile(
    r"^(?P<case>BraTS-[A-Za-z]+(?:-[A-Za-z]+)*-\d+-\d+)-(?P<mod>t1n|t1c|t2w|t2f|seg)\.nii(?:\.gz)?$", re.IGNORECASE
)
_NEW_TO_CANON = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_TIMEPOINT_RE = re.compile(r"^(?P<subject>.+)-\d+$")
_SLICE_RE = re.compile(r"_(?P<index>\d+)$")


@dataclass
class SourceCase:
    """One source case. `files` maps canonical modality (t1, t1ce, t2, flair, seg / image, mask) to its file."""

    case_id: str
    naming: str
    """brats2018 | brats2023 | images2d"""
    files: dict[str, Path] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    """Discovery-time errors (duplicates, unpaired files); a case with problems is reported failed, not converted."""
    subject: str | None = None
    """The patient this case belongs to (see the module doc); None: the case is its own subject."""
    slice_index: int | None = None
    """2D: position of the slice in its subject's volume (the file stem's trailing `_<n>`); None when unknown."""

    def expected_name(self, modality: str) -> str:
        """The file name this case's `modality` would have in its naming (for 'missing modality' messages)."""
        if self.naming == "brats2023":
            suffix = {v: k for k, v in _NEW_TO_CANON.items()}[modality]
            return f"{self.case_id}-{suffix}.nii.gz"
        return f"{self.case_id}_{modality}.nii.gz"


def _walk_files(src: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(src, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.endswith(".zarr"))
        out.extend(Path(root) / f for f in sorted(files) if not f.startswith("."))
    return out


def parse_brats_name(name: str) -> tuple[str, str, str] | None:
    """File name -> (case_id, canonical modality, naming) or None when it is not a BraTS file name."""
    m = _NEW_RE.match(name)
    if m:
        return m["case"], _NEW_TO_CANON[m["mod"].lower()], "brats2023"
    m = _OLD_RE.match(name)
    if m:
        return m["case"], m["mod"].lower(), "brats2018"
    return None


def brats_subject(case_id: str, naming: str) -> str:
    """BraTS 2023+ ids end in a timepoint (`-000`, `-001`) of one subject: drop it. Older ids are one subject each."""
    m = _TIMEPOINT_RE.match(case_id) if naming == "brats2023" else None
    return m["subject"] if m else case_id


def slice_index_of(stem: str) -> int | None:
    """Trailing `_<n>` of a 2D file stem as an int (`..._12` -> 12), else None."""
    m = _SLICE_RE.search(stem)
    return int(m["index"]) if m else None


def apply_subject_regex(cases: list[SourceCase], pattern: re.Pattern[str]) -> None:
    """Set every case's subject to group 1 of `pattern` searched in its case id. A case id that does not match gets
    a problem (it is reported failed, never silently given a fold of its own that could leak its patient)."""
    for case in cases:
        m = pattern.search(case.case_id)
        if m and m.group(1):
            case.subject = m.group(1)
        else:
            case.problems.append(
                f"case id {case.case_id!r} does not match --subject-regex {pattern.pattern!r}; expected every case "
                "id to match, with a non-empty group 1 naming the subject"
            )


def discover_brats(src: Path, warn_unmatched: bool = True) -> list[SourceCase]:
    """All BraTS cases under `src`, sorted by case id. Problems (duplicates) are attached, never raised.

    `warn_unmatched`: log how many NIfTI files match no BraTS naming (off where such files are expected, e.g.
    plain `<case_id>.nii.gz` label files for evaluation)."""
    found: dict[str, list[tuple[str, Path, str]]] = {}
    ignored = 0
    for path in _walk_files(src):
        parsed = parse_brats_name(path.name)
        if parsed is None:
            ignored += ".nii" in path.name
            continue
        case_id, mod, naming = parsed
        found.setdefault(case_id, []).append((mod, path, naming))
    cases: dict[str, SourceCase] = {}
    for case_id, entries in found.items():
        naming = entries[0][2]
        case = cases[case_id] = SourceCase(case_id, naming, subject=brats_subject(case_id, naming))
        dirs = sorted({str(p.parent) for _, p, _ in entries})
        if len(dirs) > 1:
            case.problems.append(
                f"duplicate case id {case_id!r}: files in {' and '.join(dirs)}; expected each case once under --src"
            )
        if len({n for _, _, n in entries}) > 1:
            case.problems.append(f"case id {case_id!r} mixes 2018-2021 and 2023 file names in {dirs[0]}")
        for mod, path, _ in entries:
            if mod in case.files and len(dirs) == 1:
                case.problems.append(
                    f"{path}: {mod} given twice (also {case.files[mod].name}); expected one file per modality"
                )
            case.files.setdefault(mod, path)
    if ignored and warn_unmatched:
        logger.warning("ignored %d NIfTI files under %s whose names match no BraTS naming", ignored, src)
    return [cases[k] for k in sorted(cases)]


def _stem_and_mask(path: Path) -> tuple[str, bool]:
    stem = path.stem
    if stem.lower().endswith("_mask"):
        return stem[: -len("_mask")], True
    return stem, False


def discover_images2d(src: Path) -> list[SourceCase]:
    """Pair 2D images with masks. Layouts: `images/X.ext` + `masks/X.ext`; `images/X.ext` + `masks/X_mask.ext`;
    `X.ext` + `X_mask.ext` side by side (any folder). Case id = X (made unique with the folder when needed).
    Unpaired files become cases with a problem naming the file and the mask/image that was expected.
    Subject = the folder holding the pair (images/ + masks/ count as their parent), None at the `src` root."""
    images: dict[tuple[Path, str], Path] = {}
    masks: dict[tuple[Path, str], Path] = {}
    for path in _walk_files(src):
        if path.suffix.lower() not in IMAGE_EXTS:
            continue
        stem, is_mask = _stem_and_mask(path)
        parent = path.parent
        in_masks = parent.name.lower() in ("masks", "mask", "labels")
        in_images = parent.name.lower() in ("images", "image", "imgs")
        # images/ and masks/ folders pair with each other: key them on their common parent.
        key_dir = parent.parent if (in_masks or in_images) else parent
        (masks if (is_mask or in_masks) else images)[(key_dir, stem)] = path
    cases: dict[str, SourceCase] = {}
    for key in sorted(set(images) | set(masks)):
        key_dir, stem = key
        cid = stem
        if cid in cases:  # same stem in two dataset folders: qualify with the folder, never overwrite
            cid = f"{key_dir.name}-{stem}"
        subject = key_dir.name if key_dir != src else None
        case = SourceCase(cid, "images2d", subject=subject, slice_index=slice_index_of(stem))
        if key in images:
            case.files["image"] = images[key]
        else:
            case.problems.append(f"{masks[key]}: mask without an image; expected {stem}.<png|jpg|tif> beside it "
                                 "or in images/")
        if key in masks:
            case.files["mask"] = masks[key]
        elif key in images:
            case.problems.append(f"{images[key]}: image without a mask; expected {stem}_mask.<ext> beside it or "
                                 f"masks/{stem}.<ext> / masks/{stem}_mask.<ext>")
        cases[cid] = case
    return [cases[k] for k in sorted(cases)]
