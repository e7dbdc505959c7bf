"""Fixtures for the evaluation tests: seeded generator and a runner for the real `launch/evaluate.py`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.fixture
def run_evaluate(repo_root: Path):
    """Run `python launch/evaluate.py ARGS...` as a user would (a subprocess); returns the CompletedProcess."""

    def run(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, str(repo_root / "launch" / "evaluate.py"), *map(str, args)],
                              cwd=repo_root, env=env, capture_output=True, text=True, timeout=timeout)

    return run
