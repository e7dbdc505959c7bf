"""Training that survives the cluster, through the REAL launcher (2-3 CPU ranks over gloo on loopback):
a stop signal (save, exit 4, exact resume), a rank killed or hung (the others stop and name it; a rerun resumes),
and a resume on another number of ranks (universal checkpoint; same optimizer state, the run goes on as before).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from distseg.train import elastic
from distseg.train.monitor import read_events

pytestmark = pytest.mark.slow

DEBUG = "configs/debug.yaml"
# fp32 so that runs on different rank counts agree to float summation order; micro-batch 1 x accumulation 3 on
# 2 ranks = a global batch of 6, which 1 rank (accumulation 6) and 3 ranks (accumulation 2) can keep.
LAYOUT = ["deepspeed.precision=fp32", "data.batch_size=1", "train.grad_accum=3", "train.val_every=0",
          "checkpoint.every=2", "checkpoint.keep_last=10"]


def common(store: Path, out: Path, name: str, *more: str) -> list[str]:
    return [f"data.store={store}", f"run.output_root={out}", f"run.name={name}", *LAYOUT, *more]


def supervised(runner, config: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "launch/supervise.py", *runner.launcher_cmd(config, overrides)]


def fp32_weights(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)




def optimizer_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Consolidated per-parameter fp32 weights and Adam moments (DeepSpeed's universal format), any ZeRO stage."""
    out = tag_dir.parent.parent / f"consolidated_{tag_dir.parent.parent.name}_{tag_dir.name}"
    if not out.exists():
        elastic.convert_to_universal(tag_dir, out)
    state = {}
    for param in sorted(p for p in (out / "zero").iterdir() if p.is_dir()):
        for name in ("fp32", "exp_avg", "exp_avg_sq"):
            obj = torch.load(param / f"{name}.pt", weights_only=False)  # our own file, written just now
            state[f"{param.name}/{name}"] = (obj["param"] if isinstance(obj, dict) else obj).float().flatten()
    return state


def losses(run_dir: Path) -> dict[int, float]:
    return dict(read_events(run_dir / "tb")["train/loss"])


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The training process of global `rank` among the launcher's descendants (found by its RANK variable)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if "launch/train.py" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.2)
    pytest.fail(f"no rank {rank} process under launcher {launcher.pid}")


@pytest.fixture(scope="module")
def reference(runner, brats_store, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank ZeRO-2 run of 6 steps, checkpoints at 2, 4, 6."""
    out = tmp_path_factory.mktemp("reference")
    runner.ok(runner.run(runner.launcher_cmd(DEBUG, common(brats_store, out, "ref", "deepspeed.zero_stage=2",
                                                           "train.steps=6"))))
    return out / "runs" / "ref"


def test_sigterm_to_the_supervised_launcher_saves_exits_4_and_the_rerun_matches(runner, brats_store, reference,
                                                                                  tmp_path, no_leftovers):
    args = common(brats_store, tmp_path, "stop", "deepspeed.zero_stage=2", "train.steps=6")
    ckpt = tmp_path / "runs" / "stop" / "checkpoints"
    proc = runner.start(supervised(runner, DEBUG, args), tmp_path / "stop.log")
    runner.wait_for(ckpt / "step_00000002" / "COMPLETE.json", proc)
    proc.send_signal(signal.SIGTERM)  # to the supervisor only, as Kubernetes or a terminal would
    assert proc.wait(timeout=120) == 4
    log = (tmp_path / "stop.log").read_text()
    assert "supervise: SIGTERM: asking every rank to save" in log
    assert "[rank 0] WARNING distseg.train.preemption: stop requested (SIGUSR1)" in log
    assert "[rank 1] WARNING distseg.train.preemption: stop requested (SIGUSR1)" in log
    latest = (ckpt / "latest").read_text()
    stopped_at = int(latest.removeprefix("step_"))
    assert 2 < stopped_at < 6, f"expected a stop checkpoint between the periodic ones, got {latest}"
    assert f"stopped after step {stopped_at} on request" in log
    marker = json.loads((ckpt / latest / "COMPLETE.json").read_text())
    assert marker["world_size"] == 2 and marker["grad_accum"] == 3

    # A second signal kills at once; whatever it interrupted, the newest complete checkpoint stays usable.
    proc = runner.start(supervised(runner, DEBUG, args), tmp_path / "killed.log")
    runner.wait_until(lambda: "resumed from checkpoint" in (tmp_path / "killed.log").read_text(), proc, "the resume")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGKILL
    assert "second SIGTERM: killing the job" in (tmp_path / "killed.log").read_text()
    time.sleep(1.0)
    for p in psutil.process_iter(["cmdline", "status"]):  # the kill reached every rank
        if p.info["status"] != psutil.STATUS_ZOMBIE:
            assert str(tmp_path) not in " ".join(p.info["cmdline"] or []), f"left running: {p}"

    out = runner.ok(runner.run(runner.launcher_cmd(DEBUG, args)))
    assert "resumed from checkpoint step_0000000" in out
    got, ref = fp32_weights(ckpt, "step_00000006"), fp32_weights(reference / "checkpoints", "step_00000006")
    diff = worst(got, ref)
    assert diff <= 1e-6, f"weights after stop + resume differ from the uninterrupted run by {diff}"
    # the stop flag's per-step all-reduce is measured (TB), and cheap next to a step
    ev = read_events(tmp_path / "runs" / "stop" / "tb")
    assert all(0 <= v < 1e3 * s for (_, v), (_, s) in zip(ev["perf/stop_flag_ms"], ev["perf/step_time_s"],
                                                         strict=True))


@pytest.mark.parametrize(("stage", "world"), [(2, 1), (3, 3)])
def test_resume_on_one_and_three_ranks_keeps_the_optimizer_state_and_the_loss_curve(runner, brats_store, tmp_path,
                                                                                    reference, stage, world):
    """A 2-rank checkpoint resumed on fewer ranks (ZeRO-2 on 1) and on more (ZeRO-3 on 3): each direction and each
    partitioned stage once (the universal-checkpoint path is the same for both)."""
    ref = reference if stage == 2 else None
    if ref is None:  # a ZeRO-3 reference of its own
        ref = tmp_path / "runs" / "ref3"
        runner.ok(runner.run(runner.launcher_cmd(DEBUG, common(brats_store, tmp_path, "ref3", "deepspeed.zero_stage=3",
                                                               "train.steps=6"))))
    saved = optimizer_state(ref / "checkpoints" / "step_00000002")
    assert any(k.endswith("exp_avg_sq") for k in saved)
    # the 2-rank run as it was at step 2, resumed on `world` ranks (saving what it loaded), on to step 6
    run_dir = tmp_path / "runs" / f"z{stage}_on{world}"
    shutil.copytree(ref, run_dir, ignore=shutil.ignore_patterns("step_00000004", "step_00000006", "tb",
                                                                "consolidated_*"))
    (run_dir / "checkpoints" / "latest").write_text("step_00000002")
    args = ["--config", DEBUG, *common(brats_store, tmp_path, run_dir.name, f"deepspeed.zero_stage={stage}",
                                       "train.steps=6")]
    probe = "tests/train/resave_probe.py"
    cmd = ([sys.executable, probe, *args] if world == 1 else
           runner.launcher_cmd(DEBUG, [], num_gpus=3)[:-3] + [probe, *args])
    out = runner.ok(runner.run(cmd))
    assert "resumed from checkpoint step_00000002 (step 2, written by 2 ranks, universal format)" in out
    assert f"train.grad_accum 3 -> {6 // world} keeps the global batch of 6 samples" in out
    assert (run_dir / "checkpoints" / "step_00000002" / elastic.UNIVERSAL).is_dir()  # cached beside the tag
    marker = json.loads((run_dir / "checkpoints" / "step_00000006" / "COMPLETE.json").read_text())
    assert (marker["world_size"], marker["grad_accum"]) == (world, 6 // world)

    # what the `world` ranks loaded is exactly what the 2 ranks saved: weights and Adam moments, every element
    loaded = optimizer_state(run_dir / "probe" / "step_00000002")
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved), f"ZeRO-{stage} on {world} ranks"
    # the same samples in the same micro-batches: the loss curve continues the reference's. (Not to 1e-6: the
    # instance-norm biases get gradients near float noise, which Adam's normalisation amplifies.)
    cont, orig = losses(run_dir), losses(ref)
    assert sorted(cont) == [3, 4, 5, 6]
    assert cont[3] == pytest.approx(orig[3], rel=1e-6)  # step 3 uses only the loaded state
    for s in (4, 5, 6):
        assert cont[s] == pytest.approx(orig[s], rel=5e-3), f"step {s}: {cont[s]} vs {orig[s]}"


def test_a_killed_rank_stops_the_others_with_a_message_and_a_rerun_resumes(runner, brats_store, tmp_path):
    args = common(brats_store, tmp_path, "lost", "deepspeed.zero_stage=2", "train.steps=400", "dist.timeout_s=20")
    ckpt = tmp_path / "runs" / "lost" / "checkpoints"
    proc = runner.start(runner.launcher_cmd(DEBUG, args), tmp_path / "lost.log")
    runner.wait_for(ckpt / "step_00000002" / "COMPLETE.json", proc)
    victim = rank_process(proc, 1)
    victim.kill()
    t0 = time.monotonic()
    rc = proc.wait(timeout=120)
    elapsed = time.monotonic() - t0
    log = (tmp_path / "lost.log").read_text()
    assert rc != 0
    assert elapsed < 20 + 30, f"the launcher took {elapsed:.0f}s to stop"
    # rank 0 names the lost rank and the step (deepspeed's launcher also SIGTERMs it; the message comes first)
    assert "[rank 0] ERROR distseg.train.lost_rank: rank 0: a collective failed at step" in log, log[-3000:]
    assert "rank(s) [1] did not answer the roll call" in log

    # hung rather than dead (two "nodes", so no launcher notices): the survivor waits dist.timeout_s, then names it
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = runner.free_port()
    procs = []
    for node in (0, 1):
        cmd = [runner.launcher_cmd(DEBUG, [])[0], "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", str(port), "launch/train.py", "--config", DEBUG,
               *args]
        procs.append(runner.start(cmd, tmp_path / f"hang{node}.log", OMP_NUM_THREADS="1"))
    try:
        runner.wait_until(lambda: "resumed from checkpoint" in (tmp_path / "hang0.log").read_text(), procs[0],
                          "the resume")
        hung = rank_process(procs[1], 1)
        time.sleep(2)
        hung.suspend()  # SIGSTOP: alive, holding its sockets, answering nothing
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    log0 = (tmp_path / "hang0.log").read_text()
    assert rc != 0, log0[-3000:]
    assert "Timed out" in log0 and "rank(s) [1] did not answer the roll call within 15 s" in log0, log0[-3000:]
    assert 20 <= elapsed < 20 + 15 + 30, f"node 0 stopped after {elapsed:.0f}s"

    # the next start resumes from the newest complete checkpoint and finishes
    newest = (ckpt / "latest").read_text()
    out = runner.ok(runner.run(runner.launcher_cmd(DEBUG, [*args, "train.steps=" + str(int(newest[5:]) + 2)])))
    assert f"resumed from checkpoint {newest}" in out
