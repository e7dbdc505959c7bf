"""Evaluation outputs: per-case/per-subject tables (Parquet + CSV), summary statistics (summary.md / .json),
box plots, evaluation.json and a TensorBoard entry. Every file is written under a temporary name and renamed.

Files in the output folder:
    metrics.parquet, metrics.csv     one row per (case, region); a failed case: status "failed" + error and the
                                     worst value of every metric (Dice 0, HD95 penalty), counted in the statistics
    subjects.parquet, subjects.csv   one row per (subject, region) when cases carry a subject (2D slices)
    summary.md, summary.json         mean, std, median, 25 %, 75 %, n per region and metric over every case + the
                                     conventions
    boxplot_<metric>.png             the regions side by side
    evaluation.json                  what was evaluated (`EvaluationMeta`)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from distseg.core.fileio import atomic_write, write_json, write_text
from distseg.evaluation.meta import ROLE_TEXT, EvaluationMeta, conventions_text, write_evaluation_meta
from distseg.evaluation.scoring import (
    LESION_COUNTS,
    LESION_METRICS,
    METRICS,
    SUBJECT_METRICS,
    subject_metrics,
)

log = logging.getLogger(__name__)

METRIC_TITLES = {"dice": "Dice", "iou": "IoU", "accuracy": "Pixel accuracy", "precision": "Precision",
                 "recall": "Recall (sensitivity)", "specificity": "Specificity", "hd95": "HD95",
                 "lesion_dice": "Lesion-wise Dice", "lesion_hd95": "Lesion-wise HD95"}


# --------------------------------------------------------------------------------------------------- writing
def case_schema():
    """pyarrow schema of metrics.parquet / metrics.csv (column order of the tables)."""
    import pyarrow as pa

    f64, i64, s = pa.float64(), pa.int64(), pa.string()
    return pa.schema([
        ("case_id", s), ("subject", s), ("region", s), ("status", s), ("error", s),
        *[(m, f64) for m in METRICS], *[(m, f64) for m in LESION_METRICS],
        ("pred_voxels", i64), ("gt_voxels", i64), ("pred_ml", f64), ("gt_ml", f64),
        ("tp", i64), ("fp", i64), ("fn", i64), ("tn", i64), *[(c, i64) for c in LESION_COUNTS],
        ("label_convention", s), ("pred_source", s), ("gt_source", s),
    ])


def subject_schema():
    """pyarrow schema of subjects.parquet / subjects.csv."""
    import pyarrow as pa

    i64 = pa.int64()
    return pa.schema([
        ("subject", pa.string()), ("region", pa.string()), ("n_cases", i64), ("n_failed", i64),
        *[(m, pa.float64()) for m in SUBJECT_METRICS],
        ("pred_voxels", i64), ("gt_voxels", i64), ("tp", i64), ("fp", i64), ("fn", i64), ("tn", i64),
    ])


def write_table(rows: Sequence[Mapping[str, Any]], schema: Any, out_dir: Path, stem: str) -> list[Path]:
    """rows -> `<stem>.parquet` and `<stem>.csv` (same columns and values) in `out_dir`; returns both paths."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([dict(r) for r in rows], schema=schema)
    parquet, csv = out_dir / f"{stem}.parquet", out_dir / f"{stem}.csv"
    atomic_write(parquet, lambda tmp: pq.write_table(table, tmp))
    atomic_write(csv, lambda tmp: pa_csv.write_csv(table, tmp))
    return [parquet, csv]


def read_table(path: Path) -> list[dict[str, Any]]:
    """A metrics/subjects Parquet file back as rows."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


# --------------------------------------------------------------------------------------------------- summaries
def _stats(values: Sequence[float]) -> dict[str, float | int]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "q25": math.nan, "q75": math.nan, "n": 0}
    with np.errstate(invalid="ignore"):  # inf HD95 (one_empty=inf) makes mean/std inf/nan, as it should
        return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
                "q25": float(np.percentile(v, 25)), "q75": float(np.percentile(v, 75)), "n": int(v.size)}


def summarise(rows: Sequence[Mapping[str, Any]], regions: Sequence[str],
              metrics: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """Per region and metric over every row, failed ones included (they hold the worst values):
    {region, metric, mean, std, median, q25, q75, n}. Null values (a metric a row does not have) are skipped."""
    return [{"region": region, "metric": metric,
             **_stats([r.get(metric) for r in rows if r["region"] == region])}
            for region in regions for metric in metrics]


def _fmt(value: float, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2f}" if metric.endswith("hd95") else f"{value:.4f}"


def _stats_table(summary: Sequence[Mapping[str, Any]], hd95_unit: str) -> list[str]:
    lines = ["| region | metric | mean | std | median | 25 % | 75 % | n |", "|" + " --- |" * 8]
    for s in summary:
        name = METRIC_TITLES[s["metric"]] + (f" ({hd95_unit})" if s["metric"].endswith("hd95") else "")
        cells = [_fmt(s[k], s["metric"]) for k in ("mean", "std", "median", "q25", "q75")]
        lines.append(f"| {s['region']} | {name} | {' | '.join(cells)} | {s['n']} |")
    return lines


def _model_line(meta: EvaluationMeta) -> str | None:
    m = meta.model
    if m is None:
        return None
    parts = [f"{k} {v}" for k, v in (("model", m.name), ("run", m.run), ("checkpoint", m.tag)) if v]
    if m.parameters is not None:
        parts.append(f"{m.parameters / 1e6:.2f}M parameters")
    if m.training_minutes is not None:
        parts.append(f"trained {m.training_minutes:.1f} min")
    return ", ".join(parts) if parts else None


def summary_markdown(meta: EvaluationMeta, summary: Sequence[Mapping[str, Any]],
                     subject_summary: Sequence[Mapping[str, Any]], failed: Sequence[Mapping[str, Any]],
                     n_subjects: int = 0) -> str:
    """summary.md: what was evaluated, the per-case (and per-subject) statistics, failed cases, conventions."""
    lines = [f"# Evaluation ({meta.kind}: {', '.join(meta.regions)})", "", f"- **{ROLE_TEXT[meta.role]}**"]
    model = _model_line(meta)
    if model:
        lines.append(f"- {model}")
    lines += [f"- {key}: `{value}`" for key, value in meta.sources.items()]
    if meta.label_conventions:
        lines.append(f"- label conventions: {', '.join(meta.label_conventions)}")
    missing = len(meta.notes.get("no_prediction") or [])
    lines.append(f"- cases: {meta.n_cases} counted, {meta.n_cases - meta.n_failed} scored, {meta.n_failed} failed"
                 + (f" ({missing} without a prediction)" if missing else "")
                 + (" -- failed cases score Dice 0 and the HD95 penalty in every mean" if meta.n_failed else ""))
    if meta.notes.get("no_ground_truth"):
        lines.append(f"- not scored: {len(meta.notes['no_ground_truth'])} predictions without ground truth (listed "
                     "in evaluation.json)")
    lines += ["",
              "## Per case", "", *_stats_table(summary, meta.hd95_unit), ""]
    if subject_summary:
        lines += [f"## Per subject ({n_subjects} subjects, cases stacked)", "",
                  *_stats_table(subject_summary, meta.hd95_unit), ""]
    if failed:
        lines += ["## Failed cases", "", *[f"- `{r['case_id']}`: {r['error']}" for r in failed], ""]
    lines += ["## Conventions", "", conventions_text(meta), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- box plots
def plot_boxplots(rows: Sequence[Mapping[str, Any]], regions: Sequence[str], out_dir: Path,
                  metrics: Sequence[str] = METRICS, hd95_unit: str = "mm") -> list[Path]:
    """One PNG per metric, `boxplot_<metric>.png`, with one box per region (cases as dots over the box)."""
    # Figure + Agg canvas directly: no pyplot, so no global backend state and nothing opens a window.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    rng = np.random.default_rng(0)  # fixed jitter: the same rows give the same picture
    for metric in metrics:
        data, left_out = [], 0
        for region in regions:
            v = np.asarray([r[metric] for r in rows if r["region"] == region and r.get(metric) is not None],
                           dtype=float)
            left_out += int((~np.isfinite(v)).sum())
            data.append(v[np.isfinite(v)])
        fig = Figure(figsize=(1.6 + 1.3 * len(regions), 3.6), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.boxplot(data, tick_labels=list(regions), showfliers=False, widths=0.5)
        for i, v in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, v.size), v, s=10, alpha=0.6, color="tab:blue", zorder=3)
        unit = f" ({hd95_unit})" if metric.endswith("hd95") else ""
        title = f"{METRIC_TITLES[metric]}{unit}, n = {max((len(v) for v in data), default=0)}"
        ax.set_title(title + (f" ({left_out} non-finite left out)" if left_out else ""), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"boxplot_{metric}.png"
        atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png"))
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------- meta, TB
def log_evaluation(tb_dir: str | Path, summary_rows: Sequence[Mapping[str, Any]], step: int,
                   tag_prefix: str = "eval", text: str | None = None) -> None:
    """Scalars ``<prefix>/<metric>/<region>`` (the means of `summary_rows`, e.g. `EvaluationResult.summary`) and,
    when given, `text` (e.g. summary.md) as ``<prefix>/summary`` into the TensorBoard folder `tb_dir` (a run's tb/),
    at `step` (e.g. the checkpoint's optimizer step)."""
    from distseg.train.monitor import TensorBoardMonitor

    monitor = TensorBoardMonitor(tb_dir)
    try:
        monitor.scalars({f"{tag_prefix}/{s['metric']}/{s['region']}": s["mean"] for s in summary_rows
                         if s["n"] > 0}, step)
        if text is not None:
            monitor.text(f"{tag_prefix}/summary", text, step)
    finally:
        monitor.close()


# --------------------------------------------------------------------------------------------------- all of it
@dataclass
class EvaluationResult:
    """What `write_evaluation` wrote and computed."""

    out_dir: Path
    rows: list[dict[str, Any]]
    """Per (case, region) rows (metrics.parquet)."""
    subject_rows: list[dict[str, Any]]
    """Per (subject, region) rows (subjects.parquet); [] without subjects."""
    summary: list[dict[str, Any]]
    """Per (region, metric) statistics over cases."""
    subject_summary: list[dict[str, Any]]
    """Per (region, metric) statistics over subjects."""
    markdown: str
    """summary.md."""
    meta: EvaluationMeta
    files: list[Path]

    @property
    def n_failed(self) -> int:
        return self.meta.n_failed


def write_evaluation(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, meta: EvaluationMeta) -> EvaluationResult:
    """Write every output file for scored rows (see the module doc) and return what was written.

    `meta` is copied, not changed: the result's meta has n_cases, n_failed (and the label conventions met, when
    `meta` named none) filled in from the rows."""
    meta.validate()
    meta = replace(meta)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [dict(r) for r in rows]
    failed = list({r["case_id"]: r for r in rows if r["status"] != "ok"}.values())  # one per case
    meta.n_cases = len({r["case_id"] for r in rows})
    meta.n_failed = len(failed)
    if not meta.label_conventions:
        meta.label_conventions = sorted({r["label_convention"] for r in rows if r.get("label_convention")})
    subjects = subject_metrics(rows, meta.empty_value)
    summary = summarise(rows, meta.regions, meta.metrics)
    subject_summary = summarise(subjects, meta.regions, SUBJECT_METRICS) if subjects else []
    n_subjects = len({r["subject"] for r in subjects})
    # The per-subject table repeats the per-case one when every subject is one case (BraTS); show it only when
    # some subject stacks several cases (2D slices of a patient, BraTS 2023 timepoints). The files keep it anyway.
    stacked = any(r["n_cases"] > 1 for r in subjects)
    markdown = summary_markdown(meta, summary, subject_summary if stacked else [], failed, n_subjects)
    files = write_table(rows, case_schema(), out_dir, "metrics")
    if subjects:
        files += write_table(subjects, subject_schema(), out_dir, "subjects")
    files += plot_boxplots(rows, meta.regions, out_dir, meta.metrics, hd95_unit=meta.hd95_unit)
    write_text(out_dir / "summary.md", markdown)
    write_json(out_dir / "summary.json", {
        "kind": meta.kind, "regions": meta.regions, "n_cases": meta.n_cases, "n_failed": meta.n_failed,
        "n_subjects": n_subjects, "cases": summary, "subjects": subject_summary,
        "failed": [{"case_id": r["case_id"], "error": r["error"]} for r in failed],
        "conventions": conventions_text(meta)})
    files += [out_dir / "summary.md", out_dir / "summary.json", write_evaluation_meta(out_dir, meta)]
    log.info("evaluation of %d cases (%d failed) written to %s", meta.n_cases, meta.n_failed, out_dir)
    return EvaluationResult(out_dir, rows, subjects, summary, subject_summary, markdown, meta, files)
