"""Real-data smoke tests: the budget configs train a few steps on real scans and the evaluator scores the held-out
ones (the full runs are `python -m launch.reproduce`; their numbers are in the README and .notes/real_data.md).
The 3D run keeps its step-1 checkpoint (one optimizer step at warm-up LR: an untrained model), and the trained model
must beat it on the held-out case by a margin: a pipeline that trains on the wrong labels, scores the wrong grid or
predicts nothing fails, which a 0 <= Dice <= 1 check would not notice.

3D: three real BraTS 2018 cases (converted by the real CLI, 3 folds), `configs/brats_budget.yaml` on 2 DeepSpeed
ranks with a narrower model and smaller patch, then `launch/evaluate.py --model RUN --store STORE --fold 0`.
2D: two LGG kaggle_3m patients (`preprocess images2d`, per-patient folds), `configs/lgg_budget_unet.yaml`, then the
evaluator with per-patient (stacked-slice) metrics. Each checks that the loss falls and the evaluation is complete.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distseg.train.monitor import read_events

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
BRATS_CASES = ("Brats18_2013_3_1", "Brats18_CBICA_ABM_1", "Brats18_CBICA_AOP_1")
LGG_PATIENTS = ("TCGA_CS_4941_19960909", "TCGA_CS_6665_20010817")  # folds 0 and 1 of 2 (sha256 rule)

pytestmark = pytest.mark.slow

BRATS_MARGIN = 0.10
"""WT Dice the 16-step 3D model must gain over its step-1 checkpoint on the held-out case. Measured 2026-12-06:
0.358 vs 0.120 (+0.24). TC and ET are not learnt in 16 steps (0.001 / 0.002 vs 0.09-0.10 for the untrained model,
which marks large regions), so only WT is asserted."""
BRATS_FLOOR = 0.20
"""And the trained WT Dice itself (measured 0.358)."""


def _run(cmd: list[str], timeout: int = 600) -> str:
    import os

    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{(res.stdout + res.stderr)[-5000:]}"
    return res.stdout + res.stderr


def _train(config: str, store: Path, out: Path, name: str, *overrides: str, keep_step1: bool = False) -> Path:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _run([DEEPSPEED, "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(port), "launch/train.py",
          "--config", config, f"data.store={store}", f"run.output_root={out}", f"run.name={name}",
          "train.max_minutes=null", "monitor.log_every=1", *overrides,
          *(("checkpoint.every=1", "checkpoint.keep_last=16") if keep_step1 else ("checkpoint.every=16",))])
    return out / "runs" / name


def _evaluate(model: Path, store: Path, out: Path, *extra: str) -> Path:
    _run([PYTHON, "launch/evaluate.py", "--model", str(model), "--store", str(store), "--fold", "0", "--output",
          str(out), *extra])
    return out


def _mean_dice(out: Path, table: str = "metrics.parquet") -> dict[str, float]:
    rows = pq.read_table(out / table).to_pylist()
    regions = sorted({r.get("region", "") for r in rows})
    return {g: sum(r["dice"] for r in rows if r.get("region", "") == g) / sum(r.get("region", "") == g for r in rows)
            for g in regions}


def _beats_untrained(run: Path, store: Path, tmp: Path, trained_eval: Path, margin: float, regions: set[str],
                     table: str = "metrics.parquet") -> dict[str, float]:
    """The trained model (best, else newest checkpoint; its `evaluate --model RUN` output: `trained_eval`) beats
    its own step-1 checkpoint on the held-out fold in `regions`; returns the trained mean Dice per region."""
    trained = _mean_dice(trained_eval, table)
    early = _mean_dice(_evaluate(run / "checkpoints" / "step_00000001", store, tmp / "eval_step1"), table)
    sys.stderr.write(f"\n{run.name}: mean Dice trained {trained}, step-1 checkpoint {early}\n")
    for region in regions:
        assert trained[region] >= early[region] + margin, (
            f"{region}: trained Dice {trained[region]:.3f} is not {margin} above the untrained step-1 model's "
            f"{early[region]:.3f}")
    return trained


def _loss_falls(run: Path) -> tuple[float, float]:
    by_step = dict(read_events(run / "tb")["train/loss"])
    losses = [by_step[s] for s in sorted(by_step)]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert all(math.isfinite(v) for v in losses)
    assert last < first, f"loss did not fall on real data: first 4 steps {first:.4f}, last 4 {last:.4f}"
    return first, last


def _evaluation(out: Path, n_cases: int, regions: set[str]) -> list[dict]:
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert {r["region"] for r in rows} == regions
    assert len({r["case_id"] for r in rows}) == n_cases
    for r in rows:
        assert r["status"] == "ok", r
        assert 0.0 <= r["dice"] <= 1.0 and r["hd95"] >= 0.0 and r["gt_voxels"] >= 0
    assert (out / "summary.md").is_file() and json.loads((out / "evaluation.json").read_text())
    return rows


def test_brats_budget_recipe_trains_and_evaluates_on_real_cases(shared_data: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for case in BRATS_CASES:
        (src / case).symlink_to(shared_data / "brats2018" / case, target_is_directory=True)
    _run([PYTHON, "-m", "preprocess", "brats", "--src", str(src), "--dst", str(tmp_path), "--name", "real",
          "--serial", "--folds", "3"])
    store = tmp_path / "real.zarr"
    run = _train("configs/brats_budget.yaml", store, tmp_path, "b3d", "data.val_folds=[0]",
                 "model.overrides.features=[4,8,16,32]", "data.patch_size=[32,32,32]", "train.steps=16",
                 "train.val_every=16", "optim.warmup_steps=2", keep_step1=True)
    _loss_falls(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 16
    out = tmp_path / "eval"
    _run([PYTHON, "launch/evaluate.py", "--model", str(run), "--store", str(store), "--fold", "0", "--output",
          str(out)])
    rows = _evaluation(out, 1, {"WT", "TC", "ET"})
    assert all(r["gt_voxels"] > 0 for r in rows)  # every real held-out case has all three regions
    trained = _beats_untrained(run, store, tmp_path, out, margin=BRATS_MARGIN, regions={"WT"})
    assert trained["WT"] >= BRATS_FLOOR, trained


def test_lgg_budget_recipe_trains_and_evaluates_per_patient(shared_data: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for patient in LGG_PATIENTS:
        (src / patient).symlink_to(shared_data / "seg2d" / "lgg-kaggle3m" / patient, target_is_directory=True)
    _run([PYTHON, "-m", "preprocess", "images2d", "--src", str(src), "--dst", str(tmp_path), "--name", "lgg",
          "--serial", "--folds", "2", "--channel-names", "pre,flair,post"])
    store = tmp_path / "lgg.zarr"
    run = _train("configs/lgg_budget_unet.yaml", store, tmp_path, "lgg", "data.val_folds=[0]", "train.steps=16",
                 "train.val_every=16", "optim.warmup_steps=2", "data.batch_size=4")
    _loss_falls(run)
    out = tmp_path / "eval"
    _run([PYTHON, "launch/evaluate.py", "--model", str(run), "--store", str(store), "--fold", "0", "--output",
          str(out)])
    subjects = pq.read_table(out / "subjects.parquet").to_pylist()
    held_out = {s["subject"] for s in subjects}
    assert len(held_out) == 1 and held_out <= set(LGG_PATIENTS)  # one patient per fold, never split
    patient = held_out.pop()
    n_slices = len(list((src / patient).glob("*_mask.tif")))
    _evaluation(out, n_slices, {"tumour"})  # every slice of the held-out patient, not a sample
    assert 0.0 <= subjects[0]["dice"] <= 1.0
    # No Dice floor in 2D: 16 steps of batch 4 learn nothing measurable yet (per-patient Dice 0.001 vs 0.019 for the
    # step-1 checkpoint, measured 2026-12-06); the falling loss above is what this run can show.


def test_reproduce_refuses_a_folder_without_the_real_data(tmp_path: Path) -> None:
    res = subprocess.run([PYTHON, "-m", "launch.reproduce", "--data", str(tmp_path), "--out", str(tmp_path / "o")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and str(tmp_path) in res.stderr and "brats2018" in res.stderr
    assert not (tmp_path / "o").exists()  # nothing written before the data is found
