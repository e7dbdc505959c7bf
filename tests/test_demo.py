"""The README's demo command, shrunk: synth -> local-Ray preprocessing -> `deepspeed --num_gpus 2 launch/train.py`
(ZeRO 2, bf16, 2 CPU ranks over gloo) -> summary; rerun with more steps resumes from the first run's checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.train.conftest import ok, run

# Tiny but the same pipeline as `make demo`: fewer cases, smaller patches, a few steps.
SMALL = ["data.patch_size=[32,32,32]", "data.val_patch_size=[64,96,96]", "train.val_every=2", "checkpoint.every=2",
         "monitor.log_every=1"]


def _demo(out: Path, *overrides: str) -> str:
    """`python -m launch.demo` in its own process group (killed on timeout), loopback env; its output."""
    cmd = [sys.executable, "-m", "launch.demo", "--out", str(out), "--cases", "8", *SMALL, *overrides]
    return ok(run(cmd, timeout=600))


@pytest.mark.slow
def test_demo_preprocesses_trains_reports_and_resumes(tmp_path: Path):
    out = tmp_path / "demo"
    first = _demo(out, "train.steps=4")
    manifest = out / "stores" / "demo.manifest.parquet"
    assert manifest.is_file() and (out / "stores" / "demo.zarr" / "zarr.json").is_file()
    run_dir = out / "runs" / "demo"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 4 and summary["world_size"] == 2 and summary["resumed_from"] is None
    assert summary["seconds_per_step"] > 0
    assert set(summary["val_dice"]) == {"WT", "TC", "ET"}
    assert "validation Dice per region (step 4): WT " in first
    assert f"checkpoints:  {run_dir / 'checkpoints'}" in first
    assert f"tensorboard --logdir {run_dir / 'tb'} --host 127.0.0.1" in first
    resolved = (run_dir / "config.yaml").read_text()
    assert "zero_stage: 2" in resolved and "precision: bf16" in resolved
    assert (run_dir / "checkpoints" / "step_00000004" / "COMPLETE.json").is_file()

    second = _demo(out, "train.steps=6")
    assert "synthetic cases already in" in second  # the raw cases were not regenerated
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 6 and summary["resumed_from"] == "step_00000004"
    assert "resumed from: checkpoint step_00000004" in second

    # A rerun of a finished run trains nothing and still reports the checkpoint's validation Dice.
    third = _demo(out, "train.steps=6")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == "step_00000006" and summary["seconds_per_step"] is None
    assert "validation Dice per region (step 6): WT " in third
