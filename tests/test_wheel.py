"""The installable package: build the wheel, install it into a fresh venv (the CPU torch wheel first, then the
wheel with its dependencies resolved by pip), and run the console scripts from a folder outside the checkout,
with nothing of the checkout on the path: `--help` of each command, then a synthetic store, a real 2-rank
`deepspeed --num_gpus 2 $(which distseg-train) --config debug ...` and a prediction.

The venv is made once per test session (a few minutes of pip on a quiet machine, most of it unpacking torch and
ray). `DISTSEG_WHEEL_TEST_VENV=/some/folder` keeps it there between sessions: it is created when missing, and
only the distseg wheel is reinstalled into it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distseg.core import exit_codes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "setup.py", "README.md", "LICENSE", "distseg", "preprocess", "launch", "configs"]
TORCH = "torch==2.13.0"  # the CPU wheel here (see the Makefile); a bare `torch` would pull a CUDA build


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout}s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, f"{' '.join(map(str, res.args))} exited {res.returncode}:\n{res.stdout[-5000:]}"
    return res.stdout


def _clean_env(bin_dir: Path | None = None) -> dict[str, str]:
    """This environment without the checkout: no PYTHONPATH, no launcher variables; `bin_dir` first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "VIRTUAL_ENV")}
    env.update(GLOO_SOCKET_IFNAME="lo", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The distseg wheel, built by pip from a copy of the sources (the checkout gets no build/ folder)."""
    src = tmp_path_factory.mktemp("wheel_src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    _ok(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)], src, _clean_env()))
    wheels = list(out.glob("distseg-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="session")
def venv(wheel, tmp_path_factory) -> Path:
    """A venv with the CPU torch wheel, then the distseg wheel and every dependency pip resolves for it."""
    keep = os.environ.get("DISTSEG_WHEEL_TEST_VENV")
    root = Path(keep) if keep else tmp_path_factory.mktemp("wheel_venv") / "venv"
    python, env = root / "bin" / "python", _clean_env()
    pip = [str(python), "-m", "pip", "install", "-q", "--no-compile"]
    t0 = time.perf_counter()
    if not python.exists():
        _ok(_run([sys.executable, "-m", "venv", str(root)], root.parent, env, timeout=300))
        _ok(_run([*pip, TORCH], root.parent, env, timeout=1200))
    _run([str(python), "-m", "pip", "uninstall", "-q", "-y", "distseg"], root.parent, env)
    _ok(_run([*pip, str(wheel)], root.parent, env, timeout=1800))
    sys.stderr.write(f"\nwheel venv ready in {time.perf_counter() - t0:.0f} s: {root}\n")
    return root


def test_the_wheel_carries_configs_presets_license_and_console_scripts(wheel, venv, tmp_path):
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for config in (REPO / "configs").glob("*.yaml"):
        assert f"distseg/configs/{config.name}" in names
    assert {"distseg/configs/deepspeed/zero.json", "distseg/configs/deepspeed/zero_gpu.json"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    bin_dir, env = venv / "bin", _clean_env(venv / "bin")
    where = _ok(_run([str(bin_dir / "python"), "-c", "import distseg, launch, preprocess; "
                      "from distseg.config_files import configs_dir; print(distseg.__file__, configs_dir())"],
                     tmp_path, env))
    assert str(REPO) not in where and "site-packages/distseg/configs" in where, where
    for command in ("distseg-preprocess", "distseg-train", "distseg-predict", "distseg-evaluate", "distseg-export",
                    "distseg-supervise"):
        res = _run([str(bin_dir / command), "--help"], tmp_path, env, timeout=300)
        assert res.returncode == exit_codes.OK and "usage" in res.stdout.lower(), \
            f"{command} --help exited {res.returncode}:\n{res.stdout[-3000:]}"


def test_installed_commands_preprocess_train_on_two_ranks_and_predict_outside_the_checkout(venv, tmp_path):
    bin_dir, env = venv / "bin", _clean_env(venv / "bin")
    work = tmp_path / "elsewhere"  # no configs/ here: `--config debug` and its preset `zero` come from the package
    work.mkdir()
    _ok(_run([str(bin_dir / "distseg-preprocess"), "synth", "--kind", "brats", "--n", "6", "--dst", "raw",
              "--shape", "48x48x32"], work, env))
    _ok(_run([str(bin_dir / "distseg-preprocess"), "brats", "--src", "raw", "--dst", ".", "--name", "tiny",
              "--serial", "--folds", "3"], work, env))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    train = shutil.which("distseg-train", path=str(bin_dir))
    assert train is not None
    out = _ok(_run([str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
                    str(port), train, "--config", "debug", "data.store=tiny.zarr", "run.output_root=out",
                    "run.name=wheel", "train.steps=4", "train.val_every=4", "checkpoint.every=4"], work, env))
    run = work / "out" / "runs" / "wheel"
    assert (run / "checkpoints" / "step_00000004" / "COMPLETE.json").is_file(), out[-3000:]
    assert "deepspeed.preset" not in out  # no preset error: the name resolved to the shipped JSON
    res = _run([str(bin_dir / "distseg-predict"), "--model", str(run), "--input", "tiny.zarr", "--output", "pred",
                "--fold", "0"], work, env)
    _ok(res)
    assert list((work / "pred").glob("*.nii.gz")) and list((work / "pred").glob("*_overlay.png"))
