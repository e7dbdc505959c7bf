"""DeepSpeed's CPU shared-memory all-reduce op: distseg has DeepSpeed skip it (`distseg.core.dist.skip_unused_shm_op`:
no g++ build at start-up, no 69 MB /dev/shm workspace per rank), and no workspace outlives a run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHM = Path("/dev/shm")


@pytest.mark.slow
@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm on this system")
def test_no_shared_memory_workspace_is_left_behind(runner, brats_store, tmp_path):
    port = runner.free_port()
    cmd = runner.launcher_cmd("configs/debug.yaml", [f"data.store={brats_store}", f"run.output_root={tmp_path}",
                                                     "train.steps=2", "train.val_every=0", "checkpoint.every=2"])
    cmd[cmd.index("--master_port") + 1] = str(port)
    log = runner.ok(runner.run(cmd))
    assert "done: 2 steps" in log
    assert "shm_comm" not in log, \
        "DeepSpeed built its shared-memory all-reduce op, which distseg never uses"
    left = sorted(p.name for p in SHM.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    assert not left, f"shared-memory workspaces left in /dev/shm: {left}"
