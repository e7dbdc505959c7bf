"""Several evaluation folders side by side, as Markdown tables in the seed's layout.

2D (binary): one row per model: Dice, IoU, pixel accuracy, precision, recall, parameters (+ training minutes and
per-patient Dice when known). BraTS 3D: per model the WT/TC/ET rows of Dice, sensitivity, specificity, HD95 and the
BraTS 2023 lesion-wise Dice and HD95 ("–" for evaluations written before they existed). Cells are mean ± std over
every case, failed ones included with their worst values (std: population); n is the number of cases, with the
failed ones named. Folders of different kinds give one table per kind.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distseg.evaluation.meta import EvaluationMeta, read_evaluation_meta

TWO_D_COLUMNS = (("dice", "Dice"), ("iou", "IoU"), ("accuracy", "Pixel accuracy"), ("precision", "Precision"),
                 ("recall", "Recall"))
BRATS_COLUMNS = (("dice", "Dice"), ("recall", "Sensitivity"), ("specificity", "Specificity"), ("hd95", "HD95"),
                 ("lesion_dice", "Lesion Dice"), ("lesion_hd95", "Lesion HD95"))


def _load(eval_dir: Path) -> tuple[EvaluationMeta, dict[str, Any]]:
    meta = read_evaluation_meta(eval_dir)
    path = eval_dir / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e}); expected the summary.json an evaluation writes") from e
    return meta, summary


def _stat(summary: Sequence[Mapping[str, Any]], region: str, metric: str) -> Mapping[str, Any] | None:
    return next((s for s in summary if s["region"] == region and s["metric"] == metric), None)


def _cell(stat: Mapping[str, Any] | None, metric: str) -> str:
    if stat is None or not stat.get("n"):
        return "–"
    digits = 2 if metric.endswith("hd95") else 3
    mean, std = float(stat["mean"]), float(stat["std"])  # "inf"/"nan" strings from summary.json parse as floats
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _n(meta: EvaluationMeta) -> str:
    """Cases counted in the means, e.g. "19" or "19 (2 failed)"."""
    return f"{meta.n_cases} ({meta.n_failed} failed)" if meta.n_failed else str(meta.n_cases)


def _label(meta: EvaluationMeta, eval_dir: Path) -> str:
    """The model's name, with the cases' role ("validation": they made choices; "test": none did) when known."""
    m = meta.model
    name = (m.name or m.run or eval_dir.name) if m else eval_dir.name
    return name if meta.role == "unspecified" else f"{name} ({meta.role})"


def _two_d_table(entries: list[tuple[str, EvaluationMeta, dict[str, Any]]]) -> list[str]:
    with_region = any(len(meta.regions) > 1 for _, meta, _ in entries)
    with_minutes = any(meta.model and meta.model.training_minutes is not None for _, meta, _ in entries)
    with_subjects = any(summary.get("subjects") for _, _, summary in entries)
    head = ["Model", *(["Region"] if with_region else []), *(t for _, t in TWO_D_COLUMNS), "Parameters",
            *(["Training min"] if with_minutes else []), *(["Per-patient Dice"] if with_subjects else []), "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, meta, summary in entries:
        params = meta.model.parameters if meta.model else None
        for region in meta.regions:
            cells = [label, *([region] if with_region else [])]
            cells += [_cell(_stat(summary["cases"], region, m), m) for m, _ in TWO_D_COLUMNS]
            cells.append(f"{params / 1e6:.1f}M" if params is not None else "–")
            if with_minutes:
                minutes = meta.model.training_minutes if meta.model else None
                cells.append(f"{minutes:.1f}" if minutes is not None else "–")
            if with_subjects:
                cells.append(_cell(_stat(summary.get("subjects") or [], region, "dice"), "dice"))
            cells.append(_n(meta))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _brats_table(entries: list[tuple[str, EvaluationMeta, dict[str, Any]]]) -> list[str]:
    units = {meta.hd95_unit for _, meta, _ in entries}
    head = ["Model", "Region", *(f"{t} ({'/'.join(sorted(units))})" if m.endswith("hd95") else t
                                 for m, t in BRATS_COLUMNS), "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, meta, summary in entries:
        for region in meta.regions:
            cells = [label, region, *(_cell(_stat(summary["cases"], region, m), m) for m, _ in BRATS_COLUMNS),
                     _n(meta)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def compare(eval_dirs: Sequence[str | Path]) -> str:
    """One Markdown table of several evaluation folders side by side (one table per kind when kinds are mixed).

    Models are named by `evaluation.json`'s model name, else run, else the folder name (made unique with the
    folder name when two evaluations share one). ValueError naming the folder when one is not an evaluation.
    """
    if not eval_dirs:
        raise ValueError("compare: no evaluation folders given; expected one or more folders written by evaluate")
    by_kind: dict[str, list[tuple[str, EvaluationMeta, dict[str, Any]]]] = {}
    loaded = [(Path(d), *_load(Path(d))) for d in eval_dirs]
    labels = [_label(meta, d) for d, meta, _ in loaded]
    for (eval_dir, meta, summary), label in zip(loaded, labels, strict=True):
        if labels.count(label) > 1:
            label = f"{label} ({eval_dir.name})" if label != eval_dir.name else str(eval_dir)
        by_kind.setdefault(meta.kind, []).append((label, meta, summary))
    parts = []
    for kind, entries in by_kind.items():
        table = _brats_table(entries) if kind == "brats3d" else _two_d_table(entries)
        title = "BraTS (3D)" if kind == "brats3d" else "2D segmentation"
        parts.append("\n".join(([f"### {title}", ""] if len(by_kind) > 1 else []) + table))
    return "\n\n".join(parts) + "\n"
