"""Fixtures for the trainer tests: small synthetic stores and helpers that run the REAL launcher on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
LAUNCH_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a test process must never look like a rank of someone else's job
    env.update(extra)
    return env


def launcher_cmd(config: str, overrides: list[str], num_gpus: int = 2) -> list[str]:
    """`deepspeed --num_gpus N --master_port P launch/train.py --config C k=v ...` (2 CPU ranks over gloo)."""
    return [DEEPSPEED, "--num_gpus", str(num_gpus), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "launch/train.py", "--config", config, *overrides]


def single_cmd(config: str, overrides: list[str]) -> list[str]:
    """`python launch/train.py ...`: one process, a world of one."""
    return [PYTHON, "launch/train.py", "--config", config, *overrides]


def run(cmd: list[str], timeout: int = LAUNCH_TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    """Run to completion in its own process group; on timeout kill that group (only what we started)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout}s; output tail:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    """Start in the background (own process group), output to `log`."""
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=REPO, env=train_env(**env), stdout=fh, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)


def wait_until(predicate, proc: subprocess.Popen, what: str, timeout: float = LAUNCH_TIMEOUT) -> None:
    """Poll `predicate` until true; fail when `proc` exits first or after `timeout` (then kill its group)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT) -> None:
    wait_until(path.exists, proc, f"{path} to appear", timeout)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{' '.join(result.args)} failed ({result.returncode}):\n{result.stdout[-6000:]}"
    return result.stdout


def _preprocess(*args: str) -> None:
    result = subprocess.run([PYTHON, "-m", "preprocess", *args], cwd=REPO, env=train_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="session")
def brats_store(tmp_path_factory) -> Path:
    """8 synthetic BraTS cases (~26x38x38 after the brain crop), 4 folds, written by the real preprocess CLI."""
    root = tmp_path_factory.mktemp("brats_store")
    _preprocess("synth", "--kind", "brats", "--n", "8", "--dst", str(root / "src"), "--shape", "48x48x32")
    _preprocess("brats", "--src", str(root / "src"), "--dst", str(root), "--name", "brats", "--serial",
                "--folds", "4")
    return root / "brats.zarr"


@pytest.fixture(scope="session")
def images2d_store(tmp_path_factory) -> Path:
    """8 synthetic 48x48 image/mask pairs, 4 folds."""
    root = tmp_path_factory.mktemp("images2d_store")
    _preprocess("synth", "--kind", "images2d", "--n", "8", "--dst", str(root / "src"), "--shape", "48x48")
    _preprocess("images2d", "--src", str(root / "src"), "--dst", str(root), "--name", "images2d", "--serial",
                "--folds", "4")
    return root / "images2d.zarr"


def _first_last_mean(values: list[tuple[int, float]], k: int = 3) -> tuple[float, float]:
    """Mean of the first and of the last `k` logged values (one per step; the last write of a step wins)."""
    by_step = dict(values)
    ordered = [by_step[s] for s in sorted(by_step)]
    assert len(ordered) >= 2 * k, f"need >= {2 * k} logged steps, got {len(ordered)}"
    return sum(ordered[:k]) / k, sum(ordered[-k:]) / k


def kill_leftovers(marker: str) -> list[str]:
    """SIGKILL every process whose command line mentions `marker` (a test's tmp_path): what a test started but
    could not reach by process group, e.g. jobs under launch/supervise.py (their own group). Returns what it hit."""
    import psutil

    hit = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and marker in " ".join(p.info["cmdline"] or []):
                hit.append(" ".join(p.info["cmdline"])[:120])
                p.kill()
        except psutil.Error:
            continue
    return hit


@pytest.fixture
def no_leftovers(tmp_path):
    """After the test (passed or failed), no process of it may still run; kill any and fail if there were."""
    yield
    left = kill_leftovers(str(tmp_path))
    assert not left, f"processes left running by the test (killed now): {left}"


class Runner:
    """Helpers handed to tests through the `runner` fixture (tests/ directories are not importable packages)."""

    repo = REPO
    free_port = staticmethod(free_port)
    launcher_cmd = staticmethod(launcher_cmd)
    single_cmd = staticmethod(single_cmd)
    run = staticmethod(run)
    start = staticmethod(start)
    wait_for = staticmethod(wait_for)
    wait_until = staticmethod(wait_until)
    ok = staticmethod(ok)
    first_last_mean = staticmethod(_first_last_mean)


@pytest.fixture(scope="session")
def runner() -> Runner:
    return Runner()
