"""Fixtures shared by every test area."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.s3server import s3, s3_server  # noqa: F401  (fixtures: a real S3 server on loopback)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Single-machine Ray and gloo stay on loopback in every test and every subprocess a test starts.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def require_shared_data(sub: str = "") -> Path:
    """`../shared/data[/sub]`, or a skip naming where it was looked for; in CI (`CI=true`) its absence is a failure,
    so a green CI run can never be one with every real-data test skipped."""
    path = SHARED_DATA / sub if sub else SHARED_DATA
    if not path.exists():
        reason = f"real sample data not found at {path} (it lives beside the checkout, never inside it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (real BraTS and 2D samples): skipped when absent, failed when absent under `CI=true`."""
    return require_shared_data()


_COUNT_LINE = re.compile(r"^- `(?P<case>[^`]+)`: (?P<counts>\d+: \d+(?:, \d+: \d+)*)\s*$")


def readme_label_counts(shared: Path) -> dict[str, dict[int, int]]:
    """Per-case source label voxel counts as `../shared/data/README.md` lists them ("Label voxel counts"): an
    independent check of a reader, and the list of labelled BraTS cases (the data grows; tests never hard-code it)."""
    counts: dict[str, dict[int, int]] = {}
    for line in (shared / "README.md").read_text().splitlines():
        m = _COUNT_LINE.match(line)
        if m:
            pairs = (kv.split(": ") for kv in m["counts"].split(", "))
            counts[m["case"]] = {int(k): int(v) for k, v in pairs}
    if not counts:
        raise AssertionError(f"{shared / 'README.md'}: no 'Label voxel counts' lines of the form - `case`: 0: n, ...")
    return counts
