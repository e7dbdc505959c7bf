"""Fixtures for the preprocessing tests: small synthetic BraTS/2D sources, CLI runners, a real Ray head."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from preprocess.synth import write_synth

SMALL_SHAPE = (40, 44, 28)  # (X, Y, Z): small enough that a case converts in milliseconds


@pytest.fixture(scope="session")
def synth_brats_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 synthetic BraTS 2021-layout cases (read-only: copy before modifying)."""
    d = tmp_path_factory.mktemp("synth_brats")
    write_synth("brats", 4, d, seed=7, shape=SMALL_SHAPE)
    return d


@pytest.fixture
def brats_src(synth_brats_src: Path, tmp_path: Path) -> Path:
    """A writable copy of the synthetic BraTS sources."""
    d = tmp_path / "src"
    shutil.copytree(synth_brats_src, d)
    return d


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., int]:
    """Run `python -m preprocess ...` in-process without Ray (`--serial` is added for brats/images2d)."""
    from preprocess.__main__ import main

    def run(*args: str, serial: bool = True) -> int:
        argv = list(args)
        if serial and argv[0] in ("brats", "images2d"):
            argv.append("--serial")
        try:
            return main(argv)
        except SystemExit as e:  # argparse usage errors
            return int(e.code or 0)

    return run


def read_manifest(path: Path) -> dict[str, dict]:
    """Manifest rows keyed by case_id."""
    import pyarrow.parquet as pq

    return {r["case_id"]: r for r in pq.read_table(path).to_pylist()}


@pytest.fixture
def manifest() -> Callable[[Path], dict[str, dict]]:
    return read_manifest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_bin() -> Path:
    return Path(sys.executable).parent


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"  # `python` / `ray` resolve to this venv
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env.pop("RAY_ADDRESS", None)
    env.update(extra or {})
    return env


@pytest.fixture
def ray_head() -> Iterator[dict[str, str]]:
    """A real `ray start --head` on 127.0.0.1 with free ports, own temp dir and its own auth token.

    Started under its own session (setsid) with `--block`; stopped by killing that process group, never `ray stop`.
    Yields {"dashboard": "http://127.0.0.1:PORT", "env": environment for clients}.
    """
    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's unix socket paths must stay < 108 chars
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    env = subprocess_env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    dport = free_port()
    cmd = [
        str(venv_bin() / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dport),
        "--include-dashboard", "true", "--num-cpus", "2", "--temp-dir", str(tmp), "--disable-usage-stats",
        "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
        "--metrics-export-port", str(free_port()), "--node-manager-port", str(free_port()),
        "--object-manager-port", str(free_port()),
    ]
    log = open(tmp / "head.log", "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dport}"
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray head exited with {proc.returncode}: {(tmp / 'head.log').read_text()[-3000:]}")
            r = subprocess.run([str(venv_bin() / "ray"), "job", "list", "--address", url], env=env,
                               capture_output=True, text=True)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray head dashboard not reachable at {url}: {r.stderr[-2000:]}")
            time.sleep(1)
        yield {"dashboard": url, "env": env}  # type: ignore[misc]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for `python -m preprocess` subprocesses (venv first on PATH, loopback Ray, no RAY_ADDRESS)."""
    return subprocess_env()


@pytest.fixture
def store_path(brats_src: Path, tmp_path: Path, run_cli) -> Path:
    """A sharded BraTS store written by the real converter from the synthetic cases (3 folds)."""
    assert run_cli("brats", "--src", str(brats_src), "--dst", str(tmp_path / "out"), "--name", "s", "--folds", "3") == 0
    return tmp_path / "out" / "s.zarr"
