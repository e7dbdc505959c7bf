"""The Ray paths, for real: local Ray from the CLI, `ray job submit` to a `ray start --head`, SIGKILL + rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distseg.data.store import Store
from preprocess.synth import write_synth

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "preprocess", *args]


def _assert_same_cases(got: Path, ref: Path) -> None:
    """Every case in `ref` is in `got` with identical arrays and undo attrs."""
    g, r = Store.open(got), Store.open(ref)
    assert g.case_ids() == r.case_ids()
    for cid in r.case_ids():
        gi, gl = g.read_case(cid)
        ri, rl = r.read_case(cid)
        np.testing.assert_array_equal(gi, ri)
        np.testing.assert_array_equal(gl, rl)
        for key in ("crop_box_zyx", "normalization", "label_counts", "original_shape_zyx", "sources", "fold"):
            assert g.case(cid).attrs[key] == r.case(cid).attrs[key], (cid, key)


def test_local_ray_run_with_a_bad_case(brats_src, tmp_path, manifest, cli_env, run_cli):
    bad = sorted(p for p in brats_src.iterdir())[0]
    t2 = next(bad.glob("*_t2.nii.gz"))
    t2.write_bytes(t2.read_bytes()[:100])  # truncated
    # 3 cases per task: the bad case shares a task with good ones, which are still converted
    r = subprocess.run(_cli("brats", "--src", str(brats_src), "--dst", str(tmp_path / "ray"), "--num-cpus", "2",
                            "--cases-per-task", "3"),
                       env=cli_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "3 cases per Ray task (2 tasks on 2 CPUs)" in r.stderr
    assert f"FAILED {bad.name}" in r.stderr and "truncated or corrupt gzip" in r.stderr
    rows = manifest(tmp_path / "ray" / "brats.manifest.parquet")
    assert rows[bad.name]["status"] == "failed" and sum(r["status"] == "ok" for r in rows.values()) == 3
    # Same result as the in-process path.
    assert run_cli("brats", "--src", str(brats_src), "--dst", str(tmp_path / "ref")) == 3
    _assert_same_cases(tmp_path / "ray" / "brats.zarr", tmp_path / "ref" / "brats.zarr")


DYING_WORKER = """
import json, os, sys
from preprocess.common import result_row
from preprocess.runner import init_ray, run_cases

def convert(case_id):
    if case_id == "c03":
        os._exit(1)  # the worker process dies, as when the kernel OOM-kills it
    return result_row(case_id, "ok", "")

init_ray(None, 2)
rows = run_cases(convert, [(f"c{i:02d}", (f"c{i:02d}",)) for i in range(8)], True, "test", batch=3)
print(json.dumps(rows))
"""


def test_a_task_whose_worker_dies_fails_each_of_its_cases_and_only_those(cli_env, tmp_path):
    """Batches of 3: c00-c02, c03-c05, c06-c07. The task holding c03 kills its worker on every retry; its three
    cases get failed rows naming them, every other case its own row, and the driver returns."""
    r = subprocess.run([sys.executable, "-c", DYING_WORKER], env={**cli_env, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    table = next(line for line in r.stdout.splitlines() if line.startswith('[{"case_id"'))  # Ray logs around it
    rows = {row["case_id"]: row for row in json.loads(table)}
    assert sorted(rows) == [f"c{i:02d}" for i in range(8)]
    failed = sorted(cid for cid, row in rows.items() if row["status"] == "failed")
    assert failed == ["c03", "c04", "c05"], rows
    for cid in failed:
        assert rows[cid]["error"].startswith(f"{cid}: worker failed after retries"), rows[cid]
    assert all(rows[cid]["status"] == "ok" for cid in rows if cid not in failed)


def test_ray_job_submit_to_a_started_head(ray_head, brats_src, tmp_path, manifest, run_cli):
    dst = tmp_path / "job"
    cmd = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head["dashboard"],
        "--working-dir", ".", "--runtime-env-json", json.dumps({"excludes": [".git"]}), "--",
        "python", "-m", "preprocess", "brats", "--src", str(brats_src), "--dst", str(dst), "--name", "viajob",
    ]
    r = subprocess.run(cmd, env=ray_head["env"], cwd=REPO, capture_output=True, text=True, timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "succeeded" in out and "4 converted" in out
    rows = manifest(dst / "viajob.manifest.parquet")
    assert {r["status"] for r in rows.values()} == {"ok"} and len(rows) == 4
    assert run_cli("brats", "--src", str(brats_src), "--dst", str(tmp_path / "ref"), "--name", "viajob") == 0
    _assert_same_cases(dst / "viajob.zarr", tmp_path / "ref" / "viajob.zarr")


def test_sigkill_mid_run_then_rerun(tmp_path, manifest, cli_env, run_cli):
    src = tmp_path / "src"
    n = 24
    write_synth("brats", n, src, seed=11, shape=(96, 96, 64))
    dst = tmp_path / "out"
    store_path = dst / "k.zarr"
    args = ("brats", "--src", str(src), "--dst", str(dst), "--name", "k", "--num-cpus", "2")
    log = open(tmp_path / "killed.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(_cli(*args), env=cli_env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            cases = store_path / "cases"
            visible = [d for d in os.listdir(cases) if (cases / d / "zarr.json").is_file()] if cases.is_dir() else []
            if len(visible) >= 2:
                break
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no case became visible in time"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray and every worker: one process group
        proc.wait(timeout=60)
        log.close()
    # Mid-run: no manifest yet, not every case done.
    assert not (dst / "k.manifest.parquet").exists()
    s = Store.open(store_path)
    done = s.case_ids()
    assert 2 <= len(done) < n
    for cid in done:  # whatever is visible is complete and readable
        image, label = s.read_case(cid)
        assert image.shape[1:] == label.shape

    r = subprocess.run(_cli(*args), env=cli_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = manifest(dst / "k.manifest.parquet")
    assert len(rows) == n and {r["status"] for r in rows.values()} <= {"ok", "skipped"}
    assert all(rows[cid]["status"] == "skipped" for cid in done)
    assert os.listdir(store_path / ".tmp") == []
    assert run_cli("brats", "--src", str(src), "--dst", str(tmp_path / "ref"), "--name", "k") == 0
    _assert_same_cases(store_path, tmp_path / "ref" / "k.zarr")
