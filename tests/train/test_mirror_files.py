"""Which node uploads which checkpoint file when a run's output is a bucket (`distseg.train.mirror.node_files`):
every file exactly once, by the node whose rank wrote it, whether the staging folder is node-local or shared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distseg.core.checkpoint import MARKER
from distseg.train.mirror import file_rank, node_files


def deepspeed_tag(tag_dir: Path, world: int, stage: int, bf16: bool) -> dict[str, int]:
    """A tag folder with the files a `world`-rank run saves (names as DeepSpeed 0.19 and distseg write them), and
    the rank that writes each."""
    owners = {"trainer_state.json": 0, MARKER: 0}
    optim = ("bf16_" if bf16 else "") + "zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
    if stage == 3:
        owners.update({f"zero_pp_rank_{r}_mp_rank_00_model_states.pt": r for r in range(world)})
    else:
        owners["mp_rank_00_model_states.pt"] = 0
    owners.update({optim.format(r=r): r for r in range(world)})
    owners.update({f"rng_rank{r:05d}.pt": r for r in range(world)})
    tag_dir.mkdir(parents=True)
    for name in owners:
        (tag_dir / name).write_bytes(b"x")
    (tag_dir / "universal").mkdir()  # a sub-folder (the cached universal checkpoint) is never uploaded
    return owners


@pytest.mark.parametrize(("world", "stage", "bf16"), [(4, 2, True), (4, 3, False), (8, 1, False)])
@pytest.mark.parametrize("local_size", [1, 2, 4])
def test_each_file_is_uploaded_once_by_the_node_of_the_rank_that_wrote_it(tmp_path, world, stage, bf16, local_size):
    owners = deepspeed_tag(tmp_path / "step_00000010", world, stage, bf16)
    assert {name: file_rank(name) for name in owners if name != MARKER} == {
        name: rank for name, rank in owners.items() if name != MARKER}
    nodes = world // local_size
    # a shared staging folder: every node sees every file, yet the nodes' lists partition the tag
    per_node = [{p.name for p in node_files(tmp_path / "step_00000010", node, local_size)} for node in range(nodes)]
    assert sum(len(files) for files in per_node) == len(owners) - 1  # each file once; the local marker never
    assert set().union(*per_node) == set(owners) - {MARKER}
    for node, files in enumerate(per_node):
        assert all(owners[name] // local_size == node for name in files)
    # node-local staging: a node holding only its own ranks' files uploads all of them
    for node in range(nodes):
        local = tmp_path / f"node{node}" / "step_00000010"
        local.mkdir(parents=True)
        for name, rank in owners.items():
            if rank // local_size == node:
                (local / name).write_bytes(b"x")
        assert {p.name for p in node_files(local, node, local_size)} == per_node[node]


def test_nodes_sharing_a_staging_folder_download_the_same_tag_at_once(s3, tmp_path):
    """Resume with a shared staging folder: every node's first rank downloads the bucket's newest tag into the same
    folder at the same time; each works in a temporary folder of its own, and one complete copy is left."""
    import json
    import threading

    from distseg.core import checkpoint
    from distseg.core.checkpoint_s3 import download_tag
    from distseg.train.upload_proc import bucket_store
    from tests.s3server import BUCKET, upload_tree

    tag = tmp_path / "bucket" / "checkpoints" / "step_00000010"
    tag.mkdir(parents=True)
    files = {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt": 3_000_000 + r for r in range(4)}
    for name, size in files.items():
        (tag / name).write_bytes(bytes(size))
    (tag / MARKER).write_text(json.dumps({"step": 10, "files": files}))
    upload_tree(tmp_path / "bucket", BUCKET, "run", s3.endpoint)

    staging = tmp_path / "shared" / "checkpoints"
    staging.mkdir(parents=True)
    errors: list[BaseException] = []

    def node() -> None:
        try:
            download_tag(bucket_store(f"s3://{BUCKET}/run"), "checkpoints/step_00000010", staging / "step_00000010")
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=node) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert checkpoint.read_marker(staging / "step_00000010")["files"] == files
    assert sorted(p.name for p in staging.iterdir()) == ["step_00000010"]  # no temporary folder left behind


def _tag(folder: Path, complete: bool, step: int) -> Path:
    folder.mkdir(parents=True)
    files = {"mp_rank_00_model_states.pt": 100}
    (folder / "mp_rank_00_model_states.pt").write_bytes(bytes(100))
    if complete:
        (folder / MARKER).write_text(json.dumps({"step": step, "files": files}))
    return folder


def test_installing_a_download_never_replaces_a_complete_copy_and_clears_a_stale_one(tmp_path):
    """A peer's complete copy already in place is kept as it is (same inode: no process deletes files from a copy
    another one may be reading); an incomplete leftover is replaced; nothing temporary is left behind."""
    from distseg.core.checkpoint import read_marker
    from distseg.core.checkpoint_s3 import _install

    dest = _tag(tmp_path / "step_00000010", complete=True, step=10)
    inode = dest.stat().st_ino
    _install(_tag(tmp_path / ".step_00000010.download.1", complete=True, step=10), dest)
    assert dest.stat().st_ino == inode and read_marker(dest) is not None

    stale = _tag(tmp_path / "step_00000020", complete=False, step=20)
    _install(_tag(tmp_path / ".step_00000020.download.2", complete=True, step=20), stale)
    assert read_marker(stale) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010", "step_00000020"]


def test_a_checkpoint_is_uploaded_by_a_child_process_at_a_lower_priority(s3, tmp_path):
    """The upload of a tag runs in a child process `nice` steps below the rank (its CPU yields to the ranks and
    their loaders): every file lands in the bucket byte for byte, and the child reports the niceness it ran at."""
    import os

    import boto3

    from distseg.train import upload_proc
    from tests.s3server import BUCKET

    tag = tmp_path / "step_00000010"
    tag.mkdir()
    files = {"mp_rank_00_model_states.pt": os.urandom(6_000_000), "rng_rank00000.pt": os.urandom(100)}
    for name, data in files.items():
        (tag / name).write_bytes(data)
    sizes = upload_proc.upload_in_child(f"s3://{BUCKET}/run", "checkpoints/step_00000010",
                                        [tag / name for name in files], nice=7)
    assert sizes == {name: len(data) for name, data in files.items()}
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1")
    for name, data in files.items():
        assert client.get_object(Bucket=BUCKET, Key=f"run/checkpoints/step_00000010/{name}")["Body"].read() == data

    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "distseg.train.upload_proc", "--url", f"s3://{BUCKET}/run",
                          "--prefix", "x", "--nice", "7"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"files": {}, "nice": min(19, os.nice(0) + 7)}


def test_a_failed_child_upload_names_the_object_and_the_file(s3, tmp_path):
    from distseg.train import upload_proc

    (tmp_path / "a.pt").write_bytes(b"x")
    with pytest.raises(OSError, match=r"s3://no-such-bucket-here/run/checkpoints/t/a\.pt: upload of .*a\.pt failed"):
        upload_proc.upload_in_child("s3://no-such-bucket-here/run", "checkpoints/t", [tmp_path / "a.pt"], nice=0)


def test_a_stop_signal_for_the_ranks_does_not_kill_the_upload_in_flight(s3, tmp_path):
    """Slurm signals every process of a job step; the preemption stop waits for the upload in flight, so the upload
    child must survive SIGTERM / SIGUSR1 (sent here to it directly, while it runs) and finish every file."""
    import os
    import signal
    import threading
    import time

    import boto3
    import psutil

    from distseg.train import upload_proc
    from tests.s3server import BUCKET

    big = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    big.write_bytes(os.urandom(48 * 2**20))
    result: dict[str, object] = {}

    def upload() -> None:
        try:
            result["sizes"] = upload_proc.upload_in_child(f"s3://{BUCKET}/run", "checkpoints/t", [big], nice=0)
        except BaseException as e:  # noqa: BLE001  (asserted below)
            result["error"] = e

    thread = threading.Thread(target=upload)
    thread.start()
    child = None
    for _ in range(200):
        kids = [k for k in psutil.Process().children() if "distseg.train.upload_proc" in " ".join(k.cmdline())]
        if kids:
            child = kids[0]
            break
        time.sleep(0.02)
    assert child is not None, "the upload child never started"
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        try:
            child.send_signal(sig)
        except psutil.NoSuchProcess:  # it died of the previous one: the assertion below says how
            break
        time.sleep(0.05)
    thread.join(timeout=120)
    assert "error" not in result, result.get("error")
    assert result["sizes"] == {big.name: big.stat().st_size}
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1")
    assert client.head_object(Bucket=BUCKET, Key=f"run/checkpoints/t/{big.name}")["ContentLength"] == big.stat().st_size


def test_a_save_that_waits_for_the_previous_upload_says_so(caplog):
    """An upload that outlasts the checkpoint interval stalls training at the next save: that wait is logged with
    its length (and nothing is logged when the previous upload was already done)."""
    import logging
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from distseg.train.mirror import RunMirror

    mirror = object.__new__(RunMirror)  # only the upload bookkeeping; no bucket needed
    mirror.url = "s3://bucket/out/runs/r"
    release = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        mirror._pending = pool.submit(release.wait, 5)
        threading.Timer(0.3, release.set).start()
        with caplog.at_level(logging.WARNING, logger="distseg.train.mirror"):
            waited = mirror.wait_previous("step_00000020")
        assert 0.2 < waited < 5 and mirror._pending is None
        assert "checkpoint step_00000020: training waited" in caplog.text and "s3://bucket/out/runs/r" in caplog.text
        caplog.clear()
        mirror._pending = pool.submit(lambda: None)
        mirror._pending.result()
        assert mirror.wait_previous("step_00000030") == 0.0 and caplog.text == ""
