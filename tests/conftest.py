"""Fixtures shared by every test area."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.s3server import s3, s3_server, s3_with_auth  # noqa: F401  (fixtures: real S3 servers on loopback)

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


SHARED_FIXTURE_DIRS = {"predict"}
"""Test folders whose files share expensive session fixtures (trained runs): their tests stay on one xdist worker."""
HEAVY_FIRST = ("test_demo.py", "train/test_fault.py", "train/test_launch.py", "predict", "train/test_s3_run.py",
               "test_real_smoke.py", "test_wheel.py", "train/test_slurm_script.py")
"""Groups of minutes of launcher runs, handed to the workers first so that the light tests fill the end."""


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the marks into the groups it schedules
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` runs the suite on 2 pytest-xdist workers with ``--dist loadgroup``: each test file is one group
    (its module and session fixtures are built once, on one worker), and the folders in `SHARED_FIXTURE_DIRS` are one
    group each; the groups in `HEAVY_FIRST` come first. Without xdist only the order changes."""
    tests_dir = REPO_ROOT / "tests"
    groups: dict[int, str] = {}
    for item in items:
        try:
            rel = Path(str(item.fspath)).resolve().relative_to(tests_dir)
        except ValueError:
            continue
        group = rel.parts[0] if rel.parts[0] in SHARED_FIXTURE_DIRS else rel.as_posix()
        groups[id(item)] = group
        item.add_marker(pytest.mark.xdist_group(group))

    def rank(item: pytest.Item) -> int:
        group = groups.get(id(item), "")
        return HEAVY_FIRST.index(group) if group in HEAVY_FIRST else len(HEAVY_FIRST)

    items.sort(key=rank)  # stable: the order inside a group is kept
