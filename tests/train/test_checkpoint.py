"""Checkpoint bookkeeping on real files: only COMPLETE tags count, truncation is caught, pruning keeps last + best,
RNG states round-trip through torch.load(weights_only=True). (Saving through DeepSpeed: tests/train/test_launch.py)"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distseg.core import checkpoint

REPO = Path(__file__).resolve().parents[2]


def fake_tag(ckpt_dir: Path, step: int, val_dice: float | None, complete: bool = True,
             val_step: int | None = -1) -> Path:
    """A tag folder laid out like `checkpoint.save` leaves it (payload files + marker listing their sizes)."""
    tag_dir = ckpt_dir / checkpoint.tag_for(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x" * (100 + step))
    (tag_dir / checkpoint.STATE_FILE).write_text(json.dumps({"counters": {"step": step}}))
    if complete:
        files = {p.name: p.stat().st_size for p in tag_dir.iterdir()}
        marker = {"step": step, "world_size": 2, "val_dice": val_dice, "files": files,
                  "val_step": step if val_step == -1 else val_step}
        (tag_dir / checkpoint.MARKER).write_text(json.dumps(marker))
    return tag_dir


def test_only_complete_checkpoints_count(tmp_path: Path):
    fake_tag(tmp_path, 4, 0.5)
    fake_tag(tmp_path, 8, 0.6)
    fake_tag(tmp_path, 12, None, complete=False)  # a save killed before its marker
    assert [s for s, _, _ in checkpoint.complete_checkpoints(tmp_path)] == [4, 8]
    assert checkpoint.newest_complete(tmp_path)[0] == "step_00000008"
    # a file cut short after the marker was written also disqualifies the tag
    payload = tmp_path / "step_00000008" / "mp_rank_00_model_states.pt"
    payload.write_bytes(payload.read_bytes()[:10])
    assert checkpoint.newest_complete(tmp_path)[0] == "step_00000004"
    # so does a missing or unreadable marker
    (tmp_path / "step_00000004" / checkpoint.MARKER).write_text("{trunc")
    assert checkpoint.newest_complete(tmp_path) is None
    assert checkpoint.newest_complete(tmp_path / "absent") is None


def test_prune_keeps_the_last_and_the_best(tmp_path: Path):
    for step, dice in [(2, 0.1), (4, 0.9), (6, 0.3), (8, 0.2), (10, None)]:
        fake_tag(tmp_path, step, dice)
    fake_tag(tmp_path, 9, 0.95, complete=False)  # debris older than a kept complete tag: never "best", removed
    fake_tag(tmp_path, 12, 0.95, complete=False)  # newer than every complete tag: nothing supersedes it, kept
    checkpoint.prune(tmp_path, keep_last=2, keep_best=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_00000004", "step_00000008",
                                                                         "step_00000010", "step_00000012"]
    assert (tmp_path / "best").read_text() == "step_00000004"
    fake_tag(tmp_path, 14, 0.5)
    checkpoint.prune(tmp_path, keep_last=1, keep_best=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_00000014"]


def _unreadable_prune(ckpt_dir: str) -> None:
    """`prune` in a child process that runs as an unprivileged user (root reads a chmod-000 file anyway); from
    inside `ckpt_dir`, since pytest's temporary folders above it are private to root."""
    os.chdir(ckpt_dir)
    os.setgid(65534), os.setuid(65534)
    checkpoint.prune(Path("."), keep_last=1, keep_best=False)


@pytest.mark.parametrize("errno_name", ["EIO", "EACCES"])
def test_a_tag_whose_marker_cannot_be_read_is_never_pruned(tmp_path: Path, errno_name: str, caplog):
    """A failed read (EIO, EACCES on shared storage) is not "incomplete": the tag is kept and a warning says why.
    Only provably superseded tags go: complete older ones, and incomplete ones older than a kept complete tag."""
    for step in (2, 4, 6):
        fake_tag(tmp_path, step, 0.5)
    fake_tag(tmp_path, 3, None, complete=False)
    marker = tmp_path / "step_00000004" / checkpoint.MARKER
    if errno_name == "EIO":  # the kernel answers EIO to a read of /proc/self/mem at offset 0
        marker.unlink()
        marker.symlink_to("/proc/self/mem")
        assert checkpoint.inspect_tag(marker.parent).state == checkpoint.UNREADABLE
        with caplog.at_level(logging.WARNING, logger="distseg.core.checkpoint"):
            assert [t for _, t, _ in checkpoint.complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000006"]
            checkpoint.prune(tmp_path, keep_last=1, keep_best=False)
        assert "step_00000004: cannot read its marker" in caplog.text and "Input/output error" in caplog.text
    else:
        marker.chmod(0)
        for d in [tmp_path, *tmp_path.iterdir()]:
            d.chmod(0o777)
        if os.geteuid() == 0:
            proc = mp.get_context("fork").Process(target=_unreadable_prune, args=(str(tmp_path),))
            proc.start()
            proc.join(60)
            assert proc.exitcode == 0
        else:
            checkpoint.prune(tmp_path, keep_last=1, keep_best=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_00000004", "step_00000006"]


def test_a_listing_that_fails_is_an_error_not_an_empty_run(tmp_path: Path, caplog):
    fake_tag(tmp_path, 2, 0.5)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match="cannot list the checkpoints"):
        checkpoint.complete_checkpoints(not_a_dir)
    with caplog.at_level(logging.WARNING, logger="distseg.core.checkpoint"):
        checkpoint.prune(not_a_dir, keep_last=1, keep_best=False)
    assert "not pruning" in caplog.text


@pytest.mark.slow
def test_a_save_killed_between_its_files_and_its_marker_is_ignored_then_pruned(tmp_path: Path):
    """A real DeepSpeed save SIGKILLed after its files were written and fsynced, before COMPLETE.json: the tag is
    never resumed from, `latest` still names the previous one, and it is deleted once a newer save completes."""
    probe = [sys.executable, str(REPO / "tests" / "train" / "ckpt_kill_probe.py"), str(tmp_path)]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    killed = subprocess.run([*probe, "2", "4", "--kill-before-marker", "4"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert "saved step_00000002" in killed.stdout and "saved step_00000004" not in killed.stdout
    debris = tmp_path / "step_00000004"
    assert any(debris.glob("*optim_states.pt")) and not (debris / checkpoint.MARKER).exists()
    assert checkpoint.inspect_tag(debris).state == checkpoint.INCOMPLETE
    assert checkpoint.newest_complete(tmp_path)[0] == "step_00000002"
    assert (tmp_path / "latest").read_text() == "step_00000002"

    rerun = subprocess.run([*probe, "6"], env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resumed step_00000002" in rerun.stdout and "saved step_00000006" in rerun.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_00000002", "step_00000006"]
    assert (tmp_path / "latest").read_text() == "step_00000006"


def test_flushing_a_tag_tolerates_other_ranks_renaming_their_files(tmp_path: Path, monkeypatch):
    """Each rank fsyncs the whole tag folder while the others still write into it (CI stop 19: rank 1 listed rank
    0's temporary ``.trainer_state.<hex>.json``, which was renamed before rank 1 flushed it, and the save crashed).
    Replayed on real files: the first fsync renames the other ranks' temporaries onto their final names."""
    tag_dir = tmp_path / checkpoint.tag_for(2)
    tag_dir.mkdir()
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"m")
    (tag_dir / ".trainer_state.1c72e294d691.json").write_text("{}")
    (tag_dir / "rng_rank00001.tmp").write_bytes(b"r")
    (tag_dir / "zero_pp_rank_1_optim_states.pt.part").write_bytes(b"o")
    real_fsync, flushed = checkpoint.fsync_path, []

    def racing_fsync(path):
        if not flushed:  # the other ranks finish their atomic writes right after this rank's listing
            (tag_dir / ".trainer_state.1c72e294d691.json").replace(tag_dir / checkpoint.STATE_FILE)
            (tag_dir / "rng_rank00001.tmp").replace(tag_dir / "rng_rank00001.pt")
            (tag_dir / "zero_pp_rank_1_optim_states.pt.part").replace(tag_dir / "zero_pp_rank_1_optim_states.pt")
        flushed.append(Path(path).name)
        real_fsync(path)

    monkeypatch.setattr(checkpoint, "fsync_path", racing_fsync)
    checkpoint.fsync_tag_files(tag_dir)  # no FileNotFoundError
    assert flushed[0] == "mp_rank_00_model_states.pt" and "rng_rank00001.tmp" not in flushed
    assert not any(name.startswith(".") for name in flushed)


def test_a_dice_from_another_step_never_makes_a_checkpoint_best(tmp_path: Path):
    """A checkpoint saved between validations carries the last Dice of an earlier step: never "best"."""
    fake_tag(tmp_path, 4, 0.5)
    fake_tag(tmp_path, 6, 0.9, val_step=4)  # a stale Dice (step 4's) in step 6's marker
    fake_tag(tmp_path, 8, 0.6)
    assert checkpoint.best_tag(checkpoint.complete_checkpoints(tmp_path)) == "step_00000008"
    checkpoint.prune(tmp_path, keep_last=1, keep_best=True)
    assert (tmp_path / "best").read_text() == "step_00000008"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_00000008"]


def test_another_rank_count_keeps_the_global_batch_or_says_what_would(tmp_path: Path):
    from distseg.train import elastic

    tag_dir = fake_tag(tmp_path, 4, 0.5)  # 2 ranks; its trainer_state.json has no config: the marker must say
    marker = checkpoint.read_marker(tag_dir)
    with pytest.raises(checkpoint.CheckpointError, match="cannot tell the saved batch layout"):
        elastic.saved_layout(tag_dir, marker)
    saved = elastic.saved_layout(tag_dir, {**marker, "grad_accum": 3, "batch_size": 2, "zero_stage": 2})
    assert saved.global_batch == 12
    assert [elastic.grad_accum_for(saved, w, 2, tag_dir) for w in (1, 2, 3, 6)] == [6, 3, 2, 1]
    assert elastic.grad_accum_for(saved, 4, 1, tag_dir) == 3  # a smaller micro-batch works too
    with pytest.raises(checkpoint.CheckpointError) as err:
        elastic.grad_accum_for(saved, 4, 2, tag_dir)
    msg = str(err.value)
    assert "global batch of 12 samples (2 ranks x train.grad_accum=3 x data.batch_size=2)" in msg
    assert "a rank count in [1, 2, 3, 6] with data.batch_size=2" in msg and "data.batch_size in [1, 3]" in msg
    assert "python -m distseg.core.checkpoint export" in msg and "model.init_weights" in msg


def test_rng_state_round_trips_through_weights_only_load(tmp_path: Path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's legacy state
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def _plan_on_rank(rank: int, port: int, dirs: list[str], out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as torch_dist

    from distseg.config import ExperimentConfig
    from distseg.train import elastic

    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    plan = elastic.plan_resume(Path(dirs[rank]), ExperimentConfig(), 2)
    Path(out, f"rank{rank}.json").write_text(json.dumps([plan.tag, plan.saved.world_size]))
    torch_dist.destroy_process_group()


def test_every_rank_resumes_the_tag_rank_0_chose(tmp_path: Path):
    """Rank 1 sees a newer complete tag than rank 0 (as NFS attribute caching can show after a killed save):
    both must load rank 0's choice, never a mix of steps."""
    import socket

    import torch.multiprocessing as mp

    seen_by = [tmp_path / "rank0_view", tmp_path / "rank1_view"]
    for view in seen_by:
        fake_tag(view, 4, 0.5)
    fake_tag(seen_by[1], 8, 0.6)
    for view in seen_by:
        for tag_dir in view.glob("step_*"):
            marker = json.loads((tag_dir / checkpoint.MARKER).read_text())
            marker.update(grad_accum=1, batch_size=2, zero_stage=2)
            (tag_dir / checkpoint.MARKER).write_text(json.dumps(marker))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_plan_on_rank, args=(port, [str(v) for v in seen_by], str(tmp_path)), nprocs=2)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [["step_00000004", 2]] * 2
