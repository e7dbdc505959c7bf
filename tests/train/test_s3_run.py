"""A whole run on a real S3 server on loopback (moto, tests/s3server.py) through the REAL launcher (2 CPU ranks over
gloo): preprocess into the bucket, train with data and run output in the bucket, SIGKILL, resume on a "new machine"
(empty staging folder) from the bucket, exactly as an uninterrupted run; a half-uploaded tag is ignored, then
pruned; TensorBoard events, the resolved config and summary.json reach the bucket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from tests.s3server import BUCKET
from tests.train.conftest import train_env

pytestmark = pytest.mark.slow

DEBUG = "configs/debug.yaml"
ARGS = ["deepspeed.zero_stage=2", "deepspeed.precision=fp32", "train.steps=8", "train.val_every=0",
        "checkpoint.every=2", "checkpoint.keep_last=2"]


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _download(client, prefix: str, dest: Path) -> Path:
    for key in _keys(client, prefix):
        path = dest / key[len(prefix):].lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(path))
    return dest


def _fp32(ckpt_dir: Path, tag: str) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def test_preprocess_train_kill_and_resume_from_the_bucket(runner, s3, tmp_path):
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    env = train_env()
    for cmd in (["synth", "--kind", "brats", "--n", "6", "--dst", str(tmp_path / "src"), "--shape", "48x48x32"],
                ["brats", "--src", str(tmp_path / "src"), "--dst", f"s3://{BUCKET}/stores", "--name", "brats",
                 "--serial", "--folds", "3"]):
        done = subprocess.run([sys.executable, "-m", "preprocess", *cmd], cwd=runner.repo, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    store = f"s3://{BUCKET}/stores/brats.zarr"
    common = [f"data.store={store}", *ARGS]

    ref = runner.ok(runner.run(runner.launcher_cmd(DEBUG, [*common, f"run.output_root={tmp_path / 'ref'}",
                                                           "run.name=ref"])))
    assert "done: 8 steps" in ref

    out = f"s3://{BUCKET}/out"
    run = [*common, f"run.output_root={out}", "run.name=r"]
    marker = "out/runs/r/checkpoints/step_00000004/COMPLETE.json"
    proc = runner.start(runner.launcher_cmd(DEBUG, [*run, f"run.staging_dir={tmp_path / 'node_a'}"]),
                        tmp_path / "killed.log")
    runner.wait_until(lambda: marker in _keys(client, "out/runs/r/checkpoints/step_00000004/"), proc,
                      "the step-4 checkpoint in the bucket")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "out/runs/r/checkpoints/step_00000008/COMPLETE.json" not in _keys(client, "out/runs/r/"), \
        "the run finished before it could be killed"
    # a newer upload killed half-way: objects without COMPLETE.json (never resumed from, pruned later)
    for key in _keys(client, "out/runs/r/checkpoints/step_00000004/"):
        if not key.endswith("COMPLETE.json"):
            client.copy_object(Bucket=BUCKET, Key=key.replace("step_00000004", "step_00000007"),
                               CopySource={"Bucket": BUCKET, "Key": key})

    # a "new machine": empty staging folder; everything comes from the bucket
    log = runner.ok(runner.run(runner.launcher_cmd(DEBUG, [*run, f"run.staging_dir={tmp_path / 'node_b'}"])))
    assert "resumed from checkpoint step_0000000" in log and "step_00000007" not in log.split("resumed from")[1][:30]
    tags = {k.split("/")[4] for k in _keys(client, "out/runs/r/checkpoints/step_")}
    assert tags == {"step_00000006", "step_00000008"}, tags  # keep_last=2; the half-uploaded tag 7 pruned
    assert client.get_object(Bucket=BUCKET, Key="out/runs/r/checkpoints/latest")["Body"].read() == b"step_00000008"
    for name in ("config.yaml", "summary.json"):
        assert f"out/runs/r/{name}" in _keys(client, "out/runs/r/")
    assert any("tfevents" in k for k in _keys(client, "out/runs/r/tb/"))

    got = _download(client, "out/runs/r/checkpoints/step_00000008/", tmp_path / "dl" / "step_00000008")
    a, b = _fp32(tmp_path / "ref" / "runs" / "ref" / "checkpoints", "step_00000008"), _fp32(got.parent,
                                                                                               "step_00000008")
    assert a.keys() == b.keys() and a
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"weights after kill + resume from the bucket differ from the uninterrupted run by {worst}"

    # predict and evaluate from the bucket: the run's best complete checkpoint, the store, outputs into the bucket
    env = {**env, "DISTSEG_CACHE": str(tmp_path / "cache")}
    for cmd in (["launch/predict.py", "--model", f"{out}/runs/r", "--input", store, "--fold", "0", "--output",
                 f"s3://{BUCKET}/preds"],
                ["launch/evaluate.py", "--model", f"{out}/runs/r", "--store", store, "--output", f"s3://{BUCKET}/ev"]):
        done = subprocess.run([sys.executable, *cmd], cwd=runner.repo, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert any(k.endswith(".nii.gz") for k in _keys(client, "preds/")), _keys(client, "preds/")
    assert "ev/summary.json" in _keys(client, "ev/")


def test_a_preemption_stop_waits_for_the_upload_in_flight(runner, s3, tmp_path, no_leftovers):
    """SIGTERM to the supervised launcher right after a checkpoint was saved locally (its upload starting): the
    supervisor's SIGUSR1 reaches every process of the job, the upload child included, which must finish; the stop
    checkpoint is saved, uploaded and complete in the bucket, and the job exits 4."""
    import json

    client = boto3.client("s3", endpoint_url=s3.endpoint)
    env = train_env()
    for cmd in (["synth", "--kind", "brats", "--n", "4", "--dst", str(tmp_path / "src"), "--shape", "48x48x32"],
                ["brats", "--src", str(tmp_path / "src"), "--dst", str(tmp_path), "--name", "brats", "--serial",
                 "--folds", "2"]):
        done = subprocess.run([sys.executable, "-m", "preprocess", *cmd], cwd=runner.repo, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    staging = tmp_path / "staging"
    args = [f"data.store={tmp_path / 'brats.zarr'}", "deepspeed.zero_stage=2", "deepspeed.precision=fp32",
            "train.steps=40", "train.val_every=0", "checkpoint.every=2", "checkpoint.keep_last=20",
            f"run.output_root=s3://{BUCKET}/out",
            "run.name=stop", f"run.staging_dir={staging}"]
    proc = runner.start([sys.executable, "launch/supervise.py", *runner.launcher_cmd(DEBUG, args)],
                        tmp_path / "stop.log")
    local = staging / "runs" / "stop" / "checkpoints" / "step_00000002" / "COMPLETE.json"
    runner.wait_until(local.exists, proc, "the step-2 checkpoint saved locally")
    proc.send_signal(signal.SIGTERM)  # its upload is starting now
    log_path = tmp_path / "stop.log"
    assert proc.wait(timeout=180) == 4, log_path.read_text()[-4000:]
    log = log_path.read_text()
    assert "supervise: SIGTERM: asking every rank to save" in log
    latest = client.get_object(Bucket=BUCKET, Key="out/runs/stop/checkpoints/latest")["Body"].read().decode()
    stopped_at = int(latest.removeprefix("step_"))
    assert f"stopped after step {stopped_at} on request" in log and stopped_at < 40
    keys = _keys(client, "out/runs/stop/checkpoints/")
    for tag in ("step_00000002", latest):
        marker = json.loads(client.get_object(Bucket=BUCKET, Key=f"out/runs/stop/checkpoints/{tag}/COMPLETE.json")
                            ["Body"].read())
        for name, size in marker["files"].items():
            assert f"out/runs/stop/checkpoints/{tag}/{name}" in keys, f"{tag}/{name} missing in the bucket"
            head = client.head_object(Bucket=BUCKET, Key=f"out/runs/stop/checkpoints/{tag}/{name}")
            assert head["ContentLength"] == size


def _two_nodes(runner, tmp_path: Path, name: str, overrides: list[str]) -> list[str]:
    """`deepspeed --hostfile H --no_ssh --node_rank R` twice on this machine: a 2-node job, one rank per node, each
    node with its own (node-local) staging folder. Returns both nodes' logs."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = runner.free_port()
    procs, logs = [], [tmp_path / f"{name}_node{k}.log" for k in (0, 1)]
    for node in (0, 1):
        cmd = [runner.launcher_cmd(DEBUG, [])[0], "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", str(port), "launch/train.py", "--config", DEBUG,
               *overrides, f"run.staging_dir={tmp_path / name / f'node{node}'}"]
        procs.append(runner.start(cmd, logs[node], OMP_NUM_THREADS="1"))
    for node, proc in enumerate(procs):
        try:
            rc = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            raise
        assert rc == 0, logs[node].read_text()[-5000:]
    return [log.read_text() for log in logs]


def test_two_nodes_with_node_local_staging_checkpoint_into_the_bucket_and_resume_from_it(runner, s3, brats_store,
                                                                                         tmp_path):
    """Issue 14 on two simulated nodes: each node uploads only its own rank's checkpoint files, once, and lists them
    (`uploaded/node<k:05d>.json`); rank 0 puts COMPLETE.json with both nodes' files; a rerun on two fresh nodes (empty
    staging folders) resumes from the bucket, each node downloading the complete tag."""
    import json

    from distseg.train.mirror import file_rank

    client = boto3.client("s3", endpoint_url=s3.endpoint)
    run = [f"data.store={brats_store}", "deepspeed.zero_stage=2", "deepspeed.precision=fp32", "train.val_every=0",
           "checkpoint.every=2", "checkpoint.keep_last=2", f"run.output_root=s3://{BUCKET}/out", "run.name=nodes"]
    log0, _ = _two_nodes(runner, tmp_path, "first", [*run, "train.steps=6"])
    assert "nnodes=2, num_local_procs=1, node_rank=0" in log0
    ckpts = "out/runs/nodes/checkpoints"
    assert {k.split("/")[4] for k in _keys(client, f"{ckpts}/step_")} == {"step_00000004", "step_00000006"}
    tag = f"{ckpts}/step_00000006"
    marker = json.loads(client.get_object(Bucket=BUCKET, Key=f"{tag}/COMPLETE.json")["Body"].read())
    names = {k: set(json.loads(client.get_object(Bucket=BUCKET, Key=f"{tag}/uploaded/node{k:05d}.json")["Body"]
                               .read())) for k in (0, 1)}  # {file name: size} per node
    assert names[0] and names[1] and not names[0] & names[1]
    assert names[0] | names[1] == set(marker["files"])
    for k in (0, 1):  # each node uploaded the files of its own rank only
        assert {file_rank(n) for n in names[k]} == {k}, names[k]
    assert {"rng_rank00000.pt", "rng_rank00001.pt"} <= set(marker["files"])
    for name in marker["files"]:  # each object went up once
        puts = [p for m, p, _ in s3.requests if m == "PUT" and p.split("?")[0].endswith(f"/step_00000006/{name}")]
        assert len(puts) == 1, (name, puts)

    log0, _ = _two_nodes(runner, tmp_path, "second", [*run, "train.steps=8"])
    assert "resumed from checkpoint step_00000006" in log0, log0[-3000:]  # (rank 0 logs for the job)
    assert {k.split("/")[4] for k in _keys(client, f"{ckpts}/step_")} == {"step_00000006", "step_00000008"}
    marker = json.loads(client.get_object(Bucket=BUCKET, Key=f"{ckpts}/step_00000008/COMPLETE.json")["Body"].read())
    assert marker["world_size"] == 2 and {"rng_rank00000.pt", "rng_rank00001.pt"} <= set(marker["files"])
    # each fresh staging folder received the whole tag from the bucket (the files of both ranks and the marker)
    step6 = json.loads(client.get_object(Bucket=BUCKET, Key=f"{tag}/COMPLETE.json")["Body"].read())
    for node in (0, 1):
        fetched = {p.name for p in (tmp_path / "second" / f"node{node}").rglob("step_00000006/*") if p.is_file()}
        assert fetched == {*step6["files"], "COMPLETE.json"}, (node, fetched)
