"""The README's demo command, shrunk: synth -> local-Ray preprocessing -> `deepspeed --num_gpus 2 launch/train.py`
(ZeRO 2, bf16, 2 CPU ranks over gloo) -> summary; rerun with more steps resumes from the first run's checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tiny but the same pipeline as `make demo`: fewer cases, smaller patches, a few steps.
SMALL = ["data.patch_size=[32,32,32]", "data.val_patch_size=[64,96,96]", "train.val_every=2", "checkpoint.every=2",
         "monitor.log_every=1"]


def _demo(out: Path, *overrides: str) -> str:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "launch.demo", "--out", str(out), "--cases", "8", *SMALL, *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        pytest.fail(f"demo timed out; output tail:\n{text[-4000:]}")
    assert proc.returncode == 0, text[-4000:]
    return text


@pytest.mark.slow
def test_demo_preprocesses_trains_reports_and_resumes(tmp_path: Path):
    out = tmp_path / "demo"
    first = _demo(out, "train.steps=4")
    manifest = out / "stores" / "demo.manifest.parquet"
    assert manifest.is_file() and (out / "stores" / "demo.zarr" / "zarr.json").is_file()
    run = out / "runs" / "demo"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 4 and summary["world_size"] == 2 and summary["resumed_from"] is None
    assert set(summary["val_dice"]) == {"WT", "TC", "ET"}
    assert "validation Dice per region (step 4): WT " in first
    assert f"checkpoints:  {run / 'checkpoints'}" in first
    assert f"tensorboard --logdir {run / 'tb'} --host 127.0.0.1" in first
    resolved = (run / "config.yaml").read_text()
    assert "zero_stage: 2" in resolved and "precision: bf16" in resolved
    assert (run / "checkpoints" / "step_00000004" / "COMPLETE.json").is_file()

    second = _demo(out, "train.steps=6")
    assert "synthetic cases already in" in second  # the raw cases were not regenerated
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 6 and summary["resumed_from"] == "step_00000004"
    assert "resumed from: checkpoint step_00000004" in second

    # A rerun of a finished run trains nothing and still reports the checkpoint's validation Dice.
    third = _demo(out, "train.steps=6")
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == "step_00000006"
    assert "validation Dice per region (step 6): WT " in third
