"""Fixtures for prediction/export tests: synthetic sources + stores, tiny trained runs, CLI runners."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_cmd(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run to completion in its own process group (killed as a group on timeout); stdout+stderr together."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout}s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, f"{' '.join(map(str, res.args))} exited {res.returncode}:\n{res.stdout[-5000:]}"
    return res.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def predict_cli():
    """`python launch/predict.py ARGS...` -> CompletedProcess (exit status + combined output)."""
    return lambda *args, timeout=600: run_cmd([PYTHON, "launch/predict.py", *map(str, args)], timeout)


@pytest.fixture(scope="session")
def predict_launcher():
    """`deepspeed --num_gpus N launch/predict.py ARGS...` (N CPU processes here)."""
    def run(*args, num_gpus: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
        return run_cmd([DEEPSPEED, "--num_gpus", str(num_gpus), "--master_addr", "127.0.0.1", "--master_port",
                        str(free_port()), "launch/predict.py", *map(str, args)], timeout)
    return run


@pytest.fixture(scope="session")
def train_cli():
    """`python launch/train.py ARGS...` (one process, a world of one)."""
    return lambda *args, timeout=600: run_cmd([PYTHON, "launch/train.py", *map(str, args)], timeout)


@pytest.fixture(scope="session")
def evaluate_cli():
    return lambda *args, timeout=600: run_cmd([PYTHON, "launch/evaluate.py", *map(str, args)], timeout)


@pytest.fixture(scope="session")
def export_cli():
    return lambda *args, timeout=600: run_cmd([PYTHON, "-m", "distseg.inference.export", *map(str, args)], timeout)


@pytest.fixture(scope="session")
def brats_data(tmp_path_factory) -> tuple[Path, Path]:
    """(raw synthetic BraTS case folders, their store): 8 cases 48x48x32, 4 folds, the real CLI."""
    root = tmp_path_factory.mktemp("predict_brats")
    ok(run_cmd([PYTHON, "-m", "preprocess", "synth", "--kind", "brats", "--n", "8", "--dst", str(root / "raw"),
                "--shape", "48x48x32"]))
    ok(run_cmd([PYTHON, "-m", "preprocess", "brats", "--src", str(root / "raw"), "--dst", str(root), "--name",
                "brats", "--serial", "--folds", "4"]))
    return root / "raw", root / "brats.zarr"


@pytest.fixture(scope="session")
def brats_run(brats_data, tmp_path_factory) -> Path:
    """A unet3d debug run trained 6 steps in one process (ZeRO 2, the machine's native precision): its run folder."""
    out = tmp_path_factory.mktemp("predict_runs")
    ok(run_cmd([PYTHON, "launch/train.py", "--config", "configs/debug.yaml", f"data.store={brats_data[1]}",
                f"run.output_root={out}", "run.name=p3d", "train.steps=6", "train.val_every=3",
                "checkpoint.every=3"]))
    return out / "runs" / "p3d"


@pytest.fixture(scope="session")
def brats_run_zero3(brats_data, tmp_path_factory) -> Path:
    """The same model trained on 2 ranks with ZeRO 3 by the real launcher (sharded parameters)."""
    out = tmp_path_factory.mktemp("predict_runs_z3")
    ok(run_cmd([DEEPSPEED, "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                "launch/train.py", "--config", "configs/debug.yaml", f"data.store={brats_data[1]}",
                f"run.output_root={out}", "run.name=z3", "deepspeed.zero_stage=3", "train.steps=4",
                "train.val_every=4", "checkpoint.every=4"]))
    return out / "runs" / "z3"


@pytest.fixture(scope="session")
def images_data(tmp_path_factory) -> tuple[Path, Path]:
    """(raw synthetic 2D images + masks (PNG), their store): 8 pairs 48x48."""
    root = tmp_path_factory.mktemp("predict_2d")
    ok(run_cmd([PYTHON, "-m", "preprocess", "synth", "--kind", "images2d", "--n", "8", "--dst", str(root / "raw"),
                "--shape", "48x48"]))
    ok(run_cmd([PYTHON, "-m", "preprocess", "images2d", "--src", str(root / "raw"), "--dst", str(root), "--name",
                "images2d", "--serial", "--folds", "4"]))
    return root / "raw", root / "images2d.zarr"


@pytest.fixture(scope="session")
def images_run(images_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict_runs_2d")
    # bf16 on purpose (test_zero0_bf16_checkpoint_exports_the_fp32_master_weights): ZeRO 0 + bf16 master weights
    ok(run_cmd([PYTHON, "launch/train.py", "--config", "configs/debug_image2d.yaml", f"data.store={images_data[1]}",
                f"run.output_root={out}", "run.name=p2d", "deepspeed.precision=bf16"]))
    return out / "runs" / "p2d"
