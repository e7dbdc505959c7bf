"""`cluster/slurm_train.sbatch` run for real on this machine: SLURM itself is not here, so tiny stand-ins on PATH
play its part (`scontrol show hostnames` lists two nodes and `scontrol requeue` records the job id; `srun` starts
the script's per-node command once per node with SLURM_NODEID 0 and 1, concurrently, and forwards SIGUSR1/SIGTERM
to them as srun does). Everything the script launches is real: two supervised `deepspeed --no_ssh --node_rank R`
launchers that train one job together over gloo on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.train.conftest import free_port, ok, run, start

SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") printf 'node0\\nnode1\\n' ;;
  "requeue "*) echo "$2" >> "$REQUEUED" ;;
  *) echo "scontrol stand-in: unexpected $*" >&2; exit 2 ;;
esac
"""
# srun --ntasks-per-node=1 CMD...: CMD once per node, both at once; forwards USR1/TERM; exits with the highest status.
SRUN = """#!/usr/bin/env bash
while [ "${1#--}" != "$1" ]; do shift; done
SLURM_NODEID=0 "$@" & p0=$!
SLURM_NODEID=1 "$@" & p1=$!
trap 'kill -USR1 $p0 $p1 2>/dev/null' USR1
trap 'kill -TERM $p0 $p1 2>/dev/null' TERM
rc=0
for p in $p0 $p1; do
  while :; do wait $p; r=$?; kill -0 $p 2>/dev/null || break; done
  [ $r -gt $rc ] && rc=$r
done
exit $rc
"""


def _slurm_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return dict(
        PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        SLURM_JOB_NODELIST="node[0-1]", SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_ID="4242", GPUS_PER_NODE="1",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
        REQUEUED=str(tmp_path / "requeued.txt"),
    )


@pytest.mark.slow
def test_slurm_script_launches_one_deepspeed_per_node_and_passes_overrides_intact(brats_store, tmp_path: Path,
                                                                                  no_leftovers):
    # An override with spaces must reach the trainer as one value (the script must not re-split it).
    args = ["configs/debug.yaml", f"data.store={brats_store}", f"run.output_root={tmp_path}", "run.name=slurm",
            "data.patch_size=[32, 32, 32]", "train.steps=4", "train.val_every=4", "checkpoint.every=4"]
    out = ok(run(["bash", "cluster/slurm_train.sbatch", *args], **_slurm_env(tmp_path)))
    assert "node_rank=0" in out and "node_rank=1" in out
    run_dir = tmp_path / "runs" / "slurm"
    marker = json.loads((run_dir / "checkpoints" / "step_00000004" / "COMPLETE.json").read_text())
    assert marker["world_size"] == 2
    resolved = (run_dir / "config.yaml").read_text()
    assert "patch_size: [32, 32, 32]" in resolved and "resume: auto" in resolved
    assert not (tmp_path / "requeued.txt").exists(), "a finished job must not requeue itself"


@pytest.mark.slow
def test_slurm_warning_signal_saves_requeues_and_the_requeued_job_resumes(brats_store, tmp_path: Path, no_leftovers):
    """`#SBATCH --signal=B:USR1@N` sends SIGUSR1 to the batch shell: every rank saves, the job exits 4 and asks
    `scontrol requeue` for itself; the requeued job (the same script again) resumes and finishes."""
    env = _slurm_env(tmp_path)
    args = ["configs/debug.yaml", f"data.store={brats_store}", f"run.output_root={tmp_path}", "run.name=preempt",
            "train.steps=400", "train.val_every=0", "checkpoint.every=2"]
    ckpt = tmp_path / "runs" / "preempt" / "checkpoints"
    proc = start(["bash", "cluster/slurm_train.sbatch", *args], tmp_path / "job1.log", **env)
    deadline = time.monotonic() + 300
    while not (ckpt / "step_00000002" / "COMPLETE.json").exists():
        assert proc.poll() is None, (tmp_path / "job1.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGUSR1)  # the batch shell only, like --signal=B:USR1
    assert proc.wait(timeout=180) == 4, (tmp_path / "job1.log").read_text()[-4000:]
    log = (tmp_path / "job1.log").read_text()
    assert "distseg: SIGUSR1: stopping gracefully" in log and "requeueing job 4242" in log
    assert (tmp_path / "requeued.txt").read_text().split() == ["4242"]
    stopped = (ckpt / "latest").read_text()
    assert json.loads((ckpt / stopped / "COMPLETE.json").read_text())["world_size"] == 2

    # the requeued job: same script, same arguments, a little more to train
    out = ok(run(["bash", "cluster/slurm_train.sbatch", *args[:-3], f"train.steps={int(stopped[5:]) + 2}",
                  "train.val_every=0", "checkpoint.every=2"], **env))
    assert f"resumed from checkpoint {stopped}" in out
    assert (tmp_path / "requeued.txt").read_text().split() == ["4242"], "the finished job must not requeue again"


@pytest.mark.slow
def test_crossval_array_task_trains_its_fold_where_crossval_finds_it(tmp_path: Path, no_leftovers):
    """`cluster/slurm_crossval.sbatch` as array task 1: fold 1's run, validated on fold 1 only, in the CV folder;
    the finishing step (`launch/crossval.py --skip-train`) then finds it and names the folds still missing."""
    py = [sys.executable, "-m", "preprocess"]
    ok(run([*py, "synth", "--kind", "brats", "--n", "6", "--dst", str(tmp_path / "src"), "--shape", "48x48x32"]))
    ok(run([*py, "brats", "--src", str(tmp_path / "src"), "--dst", str(tmp_path), "--name", "b", "--serial",
            "--folds", "3", "--fold-assignment", "balanced"]))
    cv = tmp_path / "cv"
    env = {**_slurm_env(tmp_path), "CV_DIR": str(cv), "SLURM_ARRAY_TASK_ID": "1"}
    args = ["configs/debug.yaml", f"data.store={tmp_path / 'b.zarr'}", "train.steps=2", "train.val_every=2",
            "checkpoint.every=2", "monitor.image_every=0"]
    spool = tmp_path / "spool" / "slurm_script"  # where sbatch runs its copy of the script from
    spool.parent.mkdir()
    shutil.copy("cluster/slurm_crossval.sbatch", spool)
    ok(run(["bash", str(spool), *args], **env))
    assert json.loads((cv / "crossval.json").read_text())["config_sha256"]  # the task checked in with its plan
    seen = json.loads((cv / "runs" / "fold_1" / "cases.json").read_text())
    assert seen["val_folds"] == [1] and len(seen["validation"]) == 2 and len(seen["train"]) == 4
    env.pop("SLURM_ARRAY_TASK_ID")
    res = run(["bash", str(spool), *args], **env)
    assert res.returncode == 2 and "fold(s) [0, 2] not trained" in res.stdout, res.stdout[-3000:]
    res = run(["bash", str(spool), *args, "optim.lr=0.5"], **{**env, "SLURM_ARRAY_TASK_ID": "2"})
    assert res.returncode == 2 and "this CV folder was made with overrides" in res.stdout, res.stdout[-3000:]
    assert not (cv / "runs" / "fold_2").exists()
    plan = json.loads((cv / "crossval.json").read_text())
    assert plan["status"] == {"0": "pending", "1": "done", "2": "pending"}
