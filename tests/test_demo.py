"""The README's demo commands, shrunk (fewer cases, a few steps), run end to end with the real tools: synthesis ->
local-Ray preprocessing -> `deepspeed --num_gpus 2 launch/train.py` (ZeRO 2, bf16, 2 CPU ranks over gloo) ->
`launch/evaluate.py --model RUN --store STORE --fold 0` -> `launch/predict.py` on a raw held-out case -> summary.
Every artefact is opened and checked; a second identical run redoes nothing; a longer run resumes training and
re-evaluates with the new checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from distseg.core.overlay import upscale_factor
from tests.train.conftest import ok, run

# A few steps, with a checkpoint, a validation and an overlay image every 2 steps.
FEW_STEPS = ["train.steps=4", "train.val_every=2", "checkpoint.every=2", "monitor.log_every=1",
             "monitor.image_every=2"]
STAGES = ["synthesis", "preprocessing", "training", "evaluation", "prediction"]


def _demo(out: Path, *args: str) -> tuple[str, dict]:
    """`python -m launch.demo` in its own process group (killed on timeout), loopback env; (output, summary)."""
    text = ok(run([sys.executable, "-m", "launch.demo", "--out", str(out), *args], timeout=600))
    return text, json.loads((out / "demo_summary.json").read_text())


# Rewritten by every run, whatever it finds: the summary, and preprocessing's manifest and store root attributes.
REWRITTEN_EACH_RUN = ("demo_summary.json", ".manifest.parquet", ".zarr/zarr.json")


def _mtimes(out: Path) -> dict[str, int]:
    """Modification times of every file the demo wrote, except those rewritten by every run."""
    return {str(p): p.stat().st_mtime_ns for p in sorted(out.rglob("*"))
            if p.is_file() and not str(p).endswith(REWRITTEN_EACH_RUN)}


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)


def _check_common(out: Path, summary: dict, text: str, store_name: str, n_cases: int, regions: list[str]) -> dict:
    """Store, manifest, checkpoints, TensorBoard, metrics tables, box plots and the printed summary; returns the
    paths of the summary."""
    import pyarrow.parquet as pq

    from distseg.core import checkpoint
    from distseg.data.store import Store
    from distseg.evaluation import read_table
    from distseg.train.monitor import read_events

    paths = summary["paths"]
    # store + manifest
    store = Store.open(Path(paths["store"]))
    assert Path(paths["store"]) == out / "stores" / f"{store_name}.zarr" and len(store.case_ids()) == n_cases
    manifest = pq.read_table(paths["manifest"]).to_pylist()
    assert len(manifest) == n_cases and {r["status"] for r in manifest} == {"ok"}
    held_out = sorted(r["case_id"] for r in manifest if r["fold"] == 0)
    assert held_out, "the synthetic set must leave cases in fold 0"
    # checkpoints: every 2 steps, complete, the latest at step 4; the evaluated one is one of them
    complete = checkpoint.complete_checkpoints(Path(paths["checkpoints"]))
    assert [step for step, _, _ in complete] == [2, 4]
    assert Path(summary["checkpoint"]).parent == Path(paths["checkpoints"])
    # TensorBoard: training scalars, validation Dice, the overlay image, and the evaluator's entry
    events = read_events(Path(paths["tensorboard"]))
    assert [s for s, _ in events["train/loss"]] == [1, 2, 3, 4]
    for region in regions:
        assert [s for s, _ in events[f"val/dice/{region}"]] == [2, 4]
        assert len(events[f"eval/dice/{region}"]) == 1
    assert events["val/overlay"][0][1].ndim == 3
    # metrics table: Parquet and CSV, one row per (held-out case, region)
    eval_dir = Path(paths["evaluation"])
    rows = read_table(eval_dir / "metrics.parquet")
    assert sorted({r["case_id"] for r in rows}) == held_out and len(rows) == len(held_out) * len(regions)
    assert all(r["status"] == "ok" and 0.0 <= r["dice"] <= 1.0 for r in rows)
    csv_lines = (eval_dir / "metrics.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith('"case_id"') and len(csv_lines) == len(rows) + 1
    for metric in ("dice", "hd95"):
        plot = _png(eval_dir / f"boxplot_{metric}.png")
        assert plot.ndim == 3 and plot.shape[0] > 100 and plot.shape[1] > 100 and plot.std() > 0
    # the summary: stages, the evaluator's numbers, where things are
    assert [s["name"] for s in summary["stages"]] == STAGES
    ev = summary["evaluation"]
    assert list(ev["regions"]) == regions and ev["n_cases"] == len(held_out) and ev["n_failed"] == 0
    for region in regions:
        assert f"{ev['regions'][region]['dice']:.3f}" in text
    for line in ("Held-out cases (folds [0]", f"checkpoints:  {paths['checkpoints']}", "metrics.parquet",
                 f"tensorboard --logdir {paths['tensorboard']} --host 127.0.0.1", "boxplot_dice.png"):
        assert line in text
    return paths


def _check_rerun_redoes_nothing(out: Path, *args: str) -> None:
    """The same command again: every stage reports "skipped" and no file it wrote was touched (raw cases, store
    arrays, checkpoints, TensorBoard events, evaluation outputs, predictions, the demo's state)."""
    before = _mtimes(out)
    text, summary = _demo(out, *args)
    assert all(s["skipped"] for s in summary["stages"]), summary["stages"]
    assert "0 converted" in text and "finished: checkpoint step_00000004" in text and " ran " not in text
    assert _mtimes(out) == before


@pytest.mark.slow
def test_demo_3d_end_to_end_rerun_and_resume(tmp_path: Path) -> None:
    import nibabel as nib

    out = tmp_path / "demo"
    args = ["--cases", "8", "data.patch_size=[32,32,32]", *FEW_STEPS]
    text, summary = _demo(out, *args)
    assert not any(s["skipped"] for s in summary["stages"])
    paths = _check_common(out, summary, text, "demo", 8, ["WT", "TC", "ET"])
    run_dir = Path(paths["run"])
    resolved = (run_dir / "config.yaml").read_text()
    from distseg.train.engine import native_precision

    # demo.yaml asks for `auto`: the run records what this machine runs natively (bf16, or fp32 on an AVX2 CPU)
    assert "zero_stage: 2" in resolved and f"precision: {native_precision()}" in resolved
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    # the prediction from the raw NIfTI files: the input's grid, affine and label convention, + an overlay
    case_dir = Path(paths["input"])
    source = nib.load(next(case_dir.glob("*_flair.nii.gz")))
    pred = nib.load(paths["nifti"])
    assert pred.shape == source.shape and np.allclose(pred.affine, source.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 4}
    overlay = _png(Path(paths["overlay"]))
    assert overlay.ndim == 3 and overlay.shape[2] == 3
    assert Path(paths["nifti"]).parent == out / "prediction" and "_overlay.png" in text

    _check_rerun_redoes_nothing(out, *args)

    # Two more steps: training resumes from step 4 and the new checkpoint is evaluated and predicted with.
    text, summary = _demo(out, *args, "train.steps=6")  # the later override wins
    stages = {s["name"]: s for s in summary["stages"]}
    assert [n for n, s in stages.items() if s["skipped"]] == ["synthesis", "preprocessing"]
    assert "resumed from step_00000004, 6 steps on 2 ranks" in stages["training"]["note"]
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == "step_00000004"
    state = json.loads((out / "demo_state.json").read_text())
    assert state["evaluation"]["checkpoint"] == state["prediction"]["checkpoint"] == summary["checkpoint"]
    assert Path(summary["checkpoint"]).name in {"step_00000004", "step_00000006"}


@pytest.mark.slow
def test_demo_2d_end_to_end_and_rerun(tmp_path: Path) -> None:
    out = tmp_path / "demo2d"
    args = ["--kind", "images2d", "--cases", "16", *FEW_STEPS]
    text, summary = _demo(out, *args)
    assert not any(s["skipped"] for s in summary["stages"])
    paths = _check_common(out, summary, text, "demo2d", 16, ["tumour"])
    cfg = (Path(paths["run"]) / "config.yaml").read_text()
    assert "name: res_inception_unet" in cfg and "mode: image2d" in cfg
    # the predicted mask: the source image's size, the source mask convention {0, 255}; an RGB overlay
    source = _png(Path(paths["input"]))
    mask = _png(Path(paths["mask"]))
    assert mask.shape == source.shape[:2] and set(np.unique(mask)) <= {0, 255}
    overlay = _png(Path(paths["overlay"]))  # image | prediction (| ground truth), each >= 480 px, source aspect
    h, w = source.shape[:2]
    k = upscale_factor(h, w)
    assert overlay.shape[1] in (2 * w * k + 4, 3 * w * k + 8) and overlay.shape[0] > h * k >= 480

    _check_rerun_redoes_nothing(out, *args)
