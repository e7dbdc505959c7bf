"""Stop signals and lost-rank classification on real processes (fast; the launcher-level tests are in
test_fault.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distseg.train import lost_rank, preemption

# Stands in for a rank: installs the stop handler like launch/train.py, "finishes its step" and exits 4.
RANK = """
import sys, time
from distseg.train.preemption import EXIT_REQUEUE, StopRequest
stop = StopRequest().install()
open(sys.argv[1], "w").close()
while not stop.requested:
    time.sleep(0.01)
sys.exit(EXIT_REQUEUE)
"""


def test_a_stop_signal_sets_the_flag_once_and_a_world_of_one_agrees():
    stop = preemption.StopRequest().install()
    try:
        assert not stop.requested and not stop.agree()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert stop.signum == signal.SIGUSR1 and stop.agree() and stop.agreed
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_supervise_turns_a_signal_into_a_graceful_stop_through_a_launcher_that_ignores_it(tmp_path: Path, sig):
    """The middle process (bash, like the deepspeed launchers) sets no SIGUSR1 handler: it inherits SIG_IGN from
    supervise and survives the group signal; the 'rank' acts on it; supervise exits with the rank's status 4."""
    ready = tmp_path / "ready"
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "launch/supervise.py", "bash", "-c", f'"{sys.executable}" {script} {ready}; exit $?']
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == preemption.EXIT_REQUEUE, err
    assert f"supervise: {signal.Signals(sig).name}: asking every rank to save" in err


def test_supervise_kills_the_group_on_a_second_signal(tmp_path: Path):
    ready = tmp_path / "ready"
    cmd = [sys.executable, "launch/supervise.py", "bash", "-c", f"touch {ready}; sleep 60"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # bash ignores the SIGUSR1 this becomes (inherited SIG_IGN)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGKILL and "second SIGTERM: killing the job" in err


def test_collective_failures_are_told_apart_from_other_errors():
    gloo_dead = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1: Connection reset by peer")
    gloo_hung = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv")
    assert lost_rank.is_collective_failure(gloo_dead) and lost_rank.is_collective_failure(gloo_hung)
    assert lost_rank.is_collective_failure(torch.distributed.DistBackendError("NCCL watchdog timeout"))
    assert not lost_rank.is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not lost_rank.is_collective_failure(ValueError("timed out"))
