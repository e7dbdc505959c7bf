"""The demo's closing summary: stage times, held-out metrics read back from the evaluator's files, where things are.

`launch/demo.py` gathers a report dict (also written to OUT/demo_summary.json); `summary_text` turns it into the
text printed at the end of `make demo` / `make demo2d`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class StageResult:
    """One demo stage as it went this time."""

    name: str
    """synthesis, preprocessing, training, evaluation or prediction."""
    seconds: float
    """Wall-clock seconds of its command this run (0 when it was not started)."""
    skipped: bool
    """True when the stage found its work complete (nothing converted, trained, evaluated or predicted)."""
    note: str
    """What happened, in a few words."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dice_hd95(summary_json: Path) -> dict[str, dict[str, float]]:
    """{region: {dice, dice_std, hd95, hd95_std}} from an evaluator's summary.json (statistics over cases)."""
    regions: dict[str, dict[str, float]] = {}
    for row in json.loads(summary_json.read_text(encoding="utf-8"))["cases"]:
        if row["metric"] in ("dice", "hd95"):
            regions.setdefault(row["region"], {})[row["metric"]] = row["mean"]
            regions[row["region"]][f"{row['metric']}_std"] = row["std"]
    return regions


def held_out_metrics(eval_dir: Path) -> dict[str, Any]:
    """Per-region Dice and HD95 (mean, std over cases) from the evaluator's files, without and (when a rule was
    chosen) with the connected-component postprocessing that `launch/predict.py --postprocess` applies."""
    summary = json.loads((eval_dir / "summary.json").read_text(encoding="utf-8"))
    meta = json.loads((eval_dir / "evaluation.json").read_text(encoding="utf-8"))
    rules: dict[str, str] = {}
    post = eval_dir / "postprocessing.json"  # rewritten by every evaluation, so never stale
    if post.is_file():
        from distseg.inference.postprocess import Postprocessing

        chosen = Postprocessing.from_dict(json.loads(post.read_text(encoding="utf-8"))["rules"])
        rules = {region: rule.describe() for region, rule in chosen.rules.items()}
    # The postprocessed scores exist only when a rule was chosen; an older folder's would be stale otherwise.
    post_summary = eval_dir / "postprocessed" / "summary.json"
    return {"regions": _dice_hd95(eval_dir / "summary.json"), "n_cases": summary["n_cases"],
            "n_failed": summary["n_failed"], "hd95_unit": meta.get("hd95_unit", "mm"),
            "folds": meta.get("sources", {}).get("folds"), "postprocessing": rules,
            "postprocessed": _dice_hd95(post_summary) if rules and post_summary.is_file() else {}}


def write_summary(path: Path, report: dict[str, Any]) -> None:
    from distseg.core.fileio import atomic_write

    text = json.dumps(report, indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _short(path: str | Path) -> str:
    """`path` relative to the working directory when it lies below it (what a user would type), else absolute."""
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _metric_rows(regions: dict[str, dict[str, float]]) -> list[str]:
    rows = []
    for region, m in regions.items():
        dice = f"{_num(m.get('dice'), '.3f')} ({_num(m.get('dice_std'), '.3f')})"
        rows.append(f"    {region:<8} {dice:<16} {_num(m.get('hd95'), '.2f')} ({_num(m.get('hd95_std'), '.2f')})")
    return rows


def summary_text(report: dict[str, Any], make_target: str) -> str:
    """The block printed at the end of the demo (paths relative to the working directory where possible)."""
    paths = report["paths"]
    ev = report["evaluation"]
    lines = ["", f"distseg demo ({report['title']}) finished in {_minutes(report['seconds'])}.", "",
             f"  {'stage':<14} {'seconds':>7}  {'status':<7}  what happened"]
    for s in report["stages"]:
        status = "skipped" if s["skipped"] else "ran"
        note = s["note"].replace(paths["out"], _short(paths["out"]))
        lines.append(f"  {s['name']:<14} {s['seconds']:>7.1f}  {status:<7}  {note}")
    lines += ["", f"  Held-out cases (folds {ev['folds']}, {ev['n_cases']} cases, {ev['n_failed']} failed), scored "
                  "whole by launch/evaluate.py; mean (std) over cases:",
              f"    {'region':<8} {'Dice':<16} HD95 ({ev['hd95_unit']})", *_metric_rows(ev["regions"])]
    rules = ev.get("postprocessing") or {}
    if rules:
        chosen = "; ".join(f"{k}: {v}" for k, v in rules.items())
        lines.append(f"  With the postprocessing chosen on them ({chosen}; what launch/predict.py --postprocess does):")
        lines += _metric_rows(ev.get("postprocessed") or {})
    evaluation = Path(paths["evaluation"])
    checkpoint = Path(report["checkpoint"]).name
    first = "nifti" if "nifti" in paths else "mask"
    what = "(the input's grid, affine and label convention)" if first == "nifti" else "(the input's size and values)"
    lines += [
        "",
        f"  store:        {_short(paths['store'])}  (manifest {_short(paths['manifest'])})",
        f"  checkpoints:  {_short(paths['checkpoints'])}  (evaluated and predicted with {checkpoint})",
        f"  TensorBoard:  {_short(paths['tensorboard'])}",
        f"  metrics:      {_short(evaluation / 'metrics.parquet')}, metrics.csv, summary.md",
        f"  box plots:    {_short(evaluation / 'boxplot_dice.png')}, boxplot_hd95.png (+ one per other metric)",
        f"  prediction:   {_short(paths[first])}  {what}",
        f"  overlay:      {_short(paths['overlay'])}",
        f"  from input:   {_short(paths['input'])}",
        f"  view it with: tensorboard --logdir {_short(paths['tensorboard'])} --host 127.0.0.1",
        f"  Rerun `make {make_target}`: finished stages are skipped, an interrupted training run resumes.",
        "",
    ]
    return "\n".join(lines)
