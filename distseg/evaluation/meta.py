"""What an evaluation evaluated and how (`EvaluationMeta`, written as evaluation.json and read back by `compare`), the
model it scored (`ModelInfo`), the cases' role (validation / test) and the metric conventions text."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from distseg.core.fileio import write_json
from distseg.evaluation.lesionwise import LESION_DILATION, LESION_HD95_PENALTY, LESION_MIN_VOLUME
from distseg.evaluation.scoring import BRATS_HD95_ONE_EMPTY, case_metrics_of

KINDS = ("brats3d", "images2d")


@dataclass
class ModelInfo:
    """The model whose predictions were evaluated (every field optional: unknown for plain prediction folders)."""

    name: str | None = None
    """Registry name, e.g. "unet3d"."""
    parameters: int | None = None
    """Trainable parameter count."""
    run: str | None = None
    """Run folder the checkpoint came from."""
    tag: str | None = None
    """Checkpoint tag, e.g. "step_00001000"."""
    training_minutes: float | None = None
    """Wall-clock training time of the run."""


ROLES = ("validation", "test", "unspecified")
ROLE_TEXT = {
    "validation": "validation cases: they made choices (checkpoint, postprocessing, configuration); optimistic scores",
    "test": "test split: cases no choice touched (checkpoint, postprocessing, learning rate, configuration)",
    "unspecified": "role unknown: these files do not say whether their cases made any choice",
}


@dataclass
class EvaluationMeta:
    """What was evaluated and how; written as evaluation.json and read back by `compare`."""

    kind: str
    """"brats3d" (WT/TC/ET of BraTS volumes) or "images2d" (binary 2D masks)."""
    regions: list[str]
    """Region names in mask-channel order."""
    sources: dict[str, str] = field(default_factory=dict)
    """Where predictions and ground truth came from, e.g. {"pred": DIR, "gt": DIR} or {"store": ..., "fold": ...}."""
    model: ModelInfo | None = None
    """The model, when known."""
    label_conventions: list[str] = field(default_factory=list)
    """Source label conventions met (brats2018, brats2023, binary01, binary255)."""
    hd95_unit: str = "mm"
    """"mm" (from voxel spacing) or "px" (2D images without a physical pixel size)."""
    hd95_one_empty: float = BRATS_HD95_ONE_EMPTY
    """HD95 when exactly one of prediction and ground truth is empty."""
    empty_value: float = 1.0
    """Value of a ratio whose denominator is 0 (Dice of two empty masks)."""
    lesion_wise: bool = True
    """BraTS 2023 lesion-wise Dice/HD95 per region (brats3d only: 2D evaluations never compute them)."""
    n_cases: int = 0
    """Cases scored or failed (filled when the outputs are written)."""
    n_failed: int = 0
    """Cases that could not be scored (missing predictions included): counted with the worst value of each metric."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping, e.g. cases without a prediction."""
    role: str = "unspecified"
    """What these cases were to the model: "validation" (they made choices: best checkpoint, postprocessing,
    learning rate, configuration; their scores are optimistic), "test" (no choice saw them: the number to report),
    or "unspecified" (files mode: the tool cannot know which cases made choices)."""

    @property
    def with_lesion_wise(self) -> bool:
        """Whether the rows carry the lesion-wise metrics (asked for, and a BraTS 3D evaluation)."""
        return self.lesion_wise and self.kind == "brats3d"

    @property
    def metrics(self) -> tuple[str, ...]:
        """The per-case metrics summarised and plotted."""
        return case_metrics_of(self.with_lesion_wise)

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"evaluation meta: kind {self.kind!r}; expected one of {KINDS}")
        if not self.regions:
            raise ValueError("evaluation meta: regions is empty; expected the region names in channel order")
        if self.hd95_unit not in ("mm", "px"):
            raise ValueError(f"evaluation meta: hd95_unit {self.hd95_unit!r}; expected 'mm' or 'px'")
        if self.role not in ROLES:
            raise ValueError(f"evaluation meta: role {self.role!r}; expected one of {', '.join(ROLES)}")


def conventions_text(meta: EvaluationMeta) -> str:
    """The metric conventions, as Markdown bullets (in summary.md, summary.json and evaluation.json)."""
    unit = "mm from the voxel spacing" if meta.hd95_unit == "mm" else "pixels (no physical pixel size)"
    lines = [
        "- Dice, IoU, precision, recall (= sensitivity), specificity and pixel accuracy come from tp/fp/fn/tn "
        "counted over every voxel of the grid (background included).",
        f"- A ratio whose denominator is 0 is {meta.empty_value:g} (BraTS: prediction and ground truth both empty "
        "-> Dice 1); prediction empty but ground truth not -> Dice 0.",
        f"- HD95: 95th percentile of the pooled symmetric distances between the face-connected surfaces "
        f"(MedPy / BraTS), in {unit}; both empty -> 0, exactly one empty -> {meta.hd95_one_empty:g}.",
    ]
    if meta.with_lesion_wise:
        lines.append(
            f"- Lesion-wise Dice / HD95 (BraTS 2023): ground-truth lesions = 26-connected components after a "
            f"{LESION_DILATION}-voxel dilation (nearby pieces merge; scored on their undilated voxels), lesions of "
            f"<= {LESION_MIN_VOLUME:g} mm^3 dropped; each lesion vs the predicted components touching its dilated "
            f"extent; a missed lesion and each false-positive component score Dice 0 / HD95 "
            f"{LESION_HD95_PENALTY:g} mm; score = sum / (lesions + false positives); nothing on either side -> "
            "Dice 1 / HD95 0. lesion_tp / lesion_fn / lesion_fp count found and missed lesions and false-positive "
            "components. Per-lesion HD95 is the HD95 above (the official script uses DeepMind's surface-distance "
            "robust Hausdorff).")
    lesion = (f"; lesion-wise Dice 0, HD95 {LESION_HD95_PENALTY:g}" if meta.with_lesion_wise else "")
    lines += [
        "- Volumes: pred_ml / gt_ml = voxels x voxel volume / 1000 (null without a spacing).",
        "- Every case counts: a ground-truth case without a prediction, or one that could not be scored, is a failed "
        f"row per region with the worst value of every metric (ratios 0, HD95 {meta.hd95_one_empty:g}{lesion}: the "
        "BraTS convention) and is included in every statistic; failed cases are listed.",
        "- Summary: std is the population std (ddof 0); 25 % / 75 % are linear-interpolated quantiles.",
        "- Per subject: the counts of a subject's cases (slices) are summed, i.e. the metrics of the stacked "
        "volume; HD95 is not defined there; a subject with a failed case scores 0.",
    ]
    return "\n".join(lines)


def write_evaluation_meta(out_dir: Path, meta: EvaluationMeta) -> Path:
    """evaluation.json: the meta fields + the conventions text + the time it was written (UTC)."""
    meta.validate()
    path = Path(out_dir) / "evaluation.json"
    write_json(path, {**asdict(meta), "conventions": conventions_text(meta),
                       "created": datetime.now(UTC).isoformat(timespec="seconds")})
    return path


def read_evaluation_meta(eval_dir: Path) -> EvaluationMeta:
    """evaluation.json of an evaluation folder back as `EvaluationMeta`; ValueError naming the file otherwise."""
    path = Path(eval_dir) / "evaluation.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e}); expected the evaluation.json an evaluation writes") from e
    known = {f for f in EvaluationMeta.__dataclass_fields__}
    fields = {k: v for k, v in raw.items() if k in known}
    if fields.get("model") is not None:
        fields["model"] = ModelInfo(**fields["model"])
    try:
        meta = EvaluationMeta(**fields)
        meta.validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e
    return meta
