"""`cluster/slurm_train.sbatch` run for real on this machine: SLURM itself is not here, so two tiny stand-ins on
PATH play its part (`scontrol show hostnames` lists two nodes; `srun` starts the script's per-node command once per
node with SLURM_NODEID 0 and 1, concurrently). Everything the script launches is real: two `deepspeed --no_ssh
--node_rank R` launchers that train one job together over gloo on loopback."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.train.conftest import free_port, ok, run

SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] || { echo "scontrol stand-in: unexpected $*" >&2; exit 2; }
printf 'node0\\nnode1\\n'
"""
# srun --ntasks-per-node=1 CMD...: CMD once per node, both at once; fails when either fails.
SRUN = """#!/usr/bin/env bash
while [ "${1#--}" != "$1" ]; do shift; done
SLURM_NODEID=0 "$@" & p0=$!
SLURM_NODEID=1 "$@" & p1=$!
wait $p0; r0=$?; wait $p1; r1=$?
exit $(( r0 || r1 ))
"""


@pytest.mark.slow
def test_slurm_script_launches_one_deepspeed_per_node_and_passes_overrides_intact(brats_store, tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(
        PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        SLURM_JOB_NODELIST="node[0-1]", SLURM_SUBMIT_DIR=str(tmp_path), GPUS_PER_NODE="1",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
    )
    # An override with spaces must reach the trainer as one value (the script must not re-split it).
    args = ["configs/debug.yaml", f"data.store={brats_store}", f"run.output_root={tmp_path}", "run.name=slurm",
            "data.patch_size=[32, 32, 32]", "train.steps=4", "train.val_every=4", "checkpoint.every=4"]
    out = ok(run(["bash", "cluster/slurm_train.sbatch", *args], **env))
    assert "node_rank=0" in out and "node_rank=1" in out
    run_dir = tmp_path / "runs" / "slurm"
    marker = json.loads((run_dir / "checkpoints" / "step_00000004" / "COMPLETE.json").read_text())
    assert marker["world_size"] == 2
    resolved = (run_dir / "config.yaml").read_text()
    assert "patch_size: [32, 32, 32]" in resolved and "resume: auto" in resolved
    assert list(tmp_path.glob("hostfile.*")), "the script writes its hostfile into SLURM_SUBMIT_DIR"
