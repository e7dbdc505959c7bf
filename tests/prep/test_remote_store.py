"""Stores on a real S3 server (moto on loopback): read through zarr's storage layer, the same arrays as on POSIX,
<= 4 GET requests per 4x128^3-style patch, and clear errors for a missing bucket or wrong credentials."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distseg.data.layout import StoreError
from distseg.data.store import Store
from tests.s3server import BUCKET, upload_tree


@pytest.fixture
def local_store(brats_src: Path, tmp_path: Path, run_cli) -> Path:
    assert run_cli("brats", "--src", str(brats_src), "--dst", str(tmp_path / "out"), "--name", "s", "--folds", "3") == 0
    return tmp_path / "out" / "s.zarr"


@pytest.mark.parametrize("backend", ["obstore", "fsspec"])
def test_a_store_in_a_bucket_reads_like_the_posix_one(s3, local_store, backend, monkeypatch):
    from distseg.data import remote

    monkeypatch.setattr(remote, "DEFAULT_BACKEND", backend)
    upload_tree(local_store, BUCKET, "stores/s.zarr", s3.endpoint)
    url = f"s3://{BUCKET}/stores/s.zarr"
    here, there = Store.open(local_store), Store.open(url)
    assert there.path == url and there.case_ids() == here.case_ids() and there._indexed
    for cid in here.case_ids():
        ref = here.read_patch(cid, (1, -3, 5), (12, 20, 24))
        s3.requests.clear()
        got = there.read_patch(cid, (1, -3, 5), (12, 20, 24))
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
        # first patch of a case: the case's zarr.json (its arrays' metadata) + 2 shard indexes + 2 range reads
        assert s3.count("GET") <= 5 and s3.count("GET", "/image/zarr.json") == 0, s3.requests
        s3.requests.clear()
        there.read_patch(cid, (3, 0, 0), (8, 16, 16))
        assert s3.count("GET") <= 4 and s3.count("GET", "/image/") >= 1, s3.requests  # handles and indexes cached
    np.testing.assert_array_equal(there.foreground(cid, 1), here.foreground(cid, 1))
    # without the index, the reader lists the cases in the bucket
    import boto3

    boto3.client("s3", endpoint_url=s3.endpoint).delete_object(Bucket=BUCKET, Key="stores/s.zarr/index.json")
    assert Store.open(url).case_ids() == here.case_ids()


def test_a_missing_bucket_or_store_is_a_clear_error(s3):
    with pytest.raises(StoreError, match=r"s3://no-such-bucket/x.zarr.*bucket does not exist"):
        Store.open("s3://no-such-bucket/x.zarr")
    with pytest.raises(StoreError, match=rf"s3://{BUCKET}/absent.zarr: not a Zarr v3 store"):
        Store.open(f"s3://{BUCKET}/absent.zarr")


def test_wrong_credentials_are_a_clear_error_that_leaks_no_secret(s3_with_auth, tmp_path, caplog):
    """A server that checks keys (moto with IAM enforced) and a key it does not know: reading a store, fetching a
    model and uploading outputs each say "access denied" with the URL, and the secret appears nowhere."""
    from distseg.data.remote import RemoteWriteError, UploadedFolder
    from distseg.inference.loading import ModelLoadError
    from distseg.inference.remote import fetch_model

    with pytest.raises(StoreError, match=rf"s3://{BUCKET}/s.zarr.*access denied.*AWS_ACCESS_KEY_ID") as e1:
        Store.open(f"s3://{BUCKET}/s.zarr")
    with pytest.raises(ModelLoadError, match=rf"s3://{BUCKET}/runs/r.*access denied") as e2:
        fetch_model(f"s3://{BUCKET}/runs/r", tmp_path / "cache")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.txt").write_text("kept")
    with pytest.raises(RemoteWriteError, match=rf"s3://{BUCKET}/out.*access denied") as e3:
        UploadedFolder(f"s3://{BUCKET}/out", tmp_path / "out").sync()
    assert (tmp_path / "out" / "a.txt").read_text() == "kept"
    for text in (str(e1.value), str(e2.value), str(e3.value), caplog.text):
        assert "wrong-secret-value" not in text


def test_preprocessing_straight_into_a_bucket(s3, brats_src, local_store, run_cli):
    """`--dst s3://bucket/prefix`: the same cases and arrays as on POSIX, manifest and index beside them; a rerun
    skips unchanged cases; a half-uploaded case (objects without its zarr.json) is never read and is redone."""
    import boto3
    import pyarrow.parquet as pq

    dst = f"s3://{BUCKET}/stores"
    assert run_cli("brats", "--src", str(brats_src), "--dst", dst, "--name", "s", "--folds", "3") == 0
    here, there = Store.open(local_store), Store.open(f"{dst}/s.zarr")
    assert there._indexed and there.case_ids() == here.case_ids()
    for cid in here.case_ids():
        for a, b in zip(here.read_case(cid), there.read_case(cid), strict=True):
            np.testing.assert_array_equal(a, b)
        assert there.case(cid).attrs == here.case(cid).attrs
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    body = client.get_object(Bucket=BUCKET, Key="stores/s.manifest.parquet")["Body"].read()
    rows = pq.read_table(pa_buffer(body)).to_pylist()
    assert sorted(r["case_id"] for r in rows) == here.case_ids() and {r["status"] for r in rows} == {"ok"}

    # a case written before its zarr.json carried its arrays' metadata: the rerun adds it (one PUT, data untouched)
    import json

    old_key = f"stores/s.zarr/cases/{here.case_ids()[1]}/zarr.json"
    doc = json.loads(client.get_object(Bucket=BUCKET, Key=old_key)["Body"].read())
    arrays = doc.pop("consolidated_metadata")
    client.put_object(Bucket=BUCKET, Key=old_key, Body=json.dumps(doc).encode())
    # a killed upload: the case's arrays are there, its zarr.json is not
    victim = here.case_ids()[0]
    client.delete_object(Bucket=BUCKET, Key=f"stores/s.zarr/cases/{victim}/zarr.json")
    client.delete_object(Bucket=BUCKET, Key="stores/s.zarr/index.json")
    assert victim not in Store.open(f"{dst}/s.zarr").case_ids()
    s3.requests.clear()
    assert run_cli("brats", "--src", str(brats_src), "--dst", dst, "--name", "s", "--folds", "3") == 0
    rows = {r["case_id"]: r["status"] for r in pq.read_table(pa_buffer(client.get_object(
        Bucket=BUCKET, Key="stores/s.manifest.parquet")["Body"].read())).to_pylist()}
    assert rows[victim] == "ok" and all(s == "skipped" for c, s in rows.items() if c != victim)
    assert json.loads(client.get_object(Bucket=BUCKET, Key=old_key)["Body"].read())["consolidated_metadata"] == arrays
    again = Store.open(f"{dst}/s.zarr")
    assert again.case_ids() == here.case_ids()
    np.testing.assert_array_equal(again.read_case(victim)[0], here.read_case(victim)[0])


def test_a_case_gone_from_the_source_leaves_the_bucket_store_but_is_kept_aside(s3, brats_src, tmp_path, run_cli,
                                                                               caplog, monkeypatch):
    """As on POSIX (tests/prep/test_rerun.py): a patient removed from --src is moved, whole, out of the store in the
    bucket to `<name>.retired/<time>/<case>/` (copied byte for byte, its zarr.json last, then removed from the
    store); the index and every reader no longer list it."""
    import shutil

    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint)
    dst = f"s3://{BUCKET}/stores"
    args = ("brats", "--src", str(brats_src), "--dst", dst, "--name", "r")
    assert run_cli(*args) == 0
    ids = Store.open(f"{dst}/r.zarr").case_ids()
    gone = ids[0]
    pages = client.get_paginator("list_objects_v2")

    def objects(prefix: str) -> dict[str, bytes]:
        keys = [o["Key"] for page in pages.paginate(Bucket=BUCKET, Prefix=prefix) for o in page.get("Contents", [])]
        return {k[len(prefix):]: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}

    before = objects(f"stores/r.zarr/cases/{gone}/")
    assert "zarr.json" in before and len(before) > 3
    shutil.move(brats_src / gone, tmp_path / gone)

    # the bucket refuses to delete: the complete copy was made first, the case stays in the store, the run goes on
    from preprocess import bucket

    real_delete = bucket.Bucket.delete
    order: list[str] = []
    real_put, real_put_many = bucket.Bucket.put, bucket.Bucket.put_many

    def put(self, key, data):
        order.append(key)
        return real_put(self, key, data)

    def put_many(self, items):
        order.extend(k for k, _ in items)
        return real_put_many(self, items)

    def refuse(self, key):
        if "/cases/" in f"/{key}" and key.endswith("zarr.json"):
            raise bucket.StoreError(f"{self.url}/{key}: access denied")
        return real_delete(self, key)

    monkeypatch.setattr(bucket.Bucket, "delete", refuse)
    monkeypatch.setattr(bucket.Bucket, "put", put)
    monkeypatch.setattr(bucket.Bucket, "put_many", put_many)
    assert run_cli(*args) == 0
    assert "could not be removed from the store" in caplog.text and "moved out of the store" not in caplog.text
    assert Store.open(f"{dst}/r.zarr").case_ids() == ids  # still listed: nothing half-done is visible
    assert objects(f"stores/r.zarr/cases/{gone}/") == before
    first = objects("stores/r.retired/")
    assert {k.split("/", 2)[2]: v for k, v in first.items() if k.split("/")[1] == gone} == before
    copied = [k for k in order if k.startswith(f"{gone}/")]  # the retired copy's keys, in upload order
    assert copied[-1] == f"{gone}/zarr.json" and len(copied) == len(before)  # its zarr.json last
    monkeypatch.setattr(bucket.Bucket, "delete", real_delete)
    caplog.clear()
    import time

    time.sleep(1.1)  # the next retirement gets its own time stamp
    assert run_cli(*args) == 0
    assert Store.open(f"{dst}/r.zarr").case_ids() == ids[1:]
    assert objects(f"stores/r.zarr/cases/{gone}/") == {}
    assert "moved out of the store" in caplog.text and gone in caplog.text
    retired = {k: v for k, v in objects("stores/r.retired/").items() if k not in first}
    assert len({k.split("/")[0] for k in retired}) == 1
    assert {k.split("/", 2)[2]: v for k, v in retired.items() if k.split("/")[1] == gone} == before


def pa_buffer(body: bytes):
    import pyarrow as pa

    return pa.BufferReader(body)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_batches_from_a_bucket_equal_those_from_posix(s3, local_store, workers):
    """`data.store=s3://...`: the training loader (forked workers open their own S3 clients) yields exactly the
    batches it yields from the same store on POSIX."""
    import itertools

    import torch

    from distseg.data.config import DataConfig
    from distseg.data.loader import build_train_loader

    upload_tree(local_store, BUCKET, "s.zarr", s3.endpoint)
    batches = []
    for where in (str(local_store), f"s3://{BUCKET}/s.zarr"):
        cfg = DataConfig(store=where, patch_size=(16, 16, 16), batch_size=2, num_workers=workers, val_folds=(0,))
        loader = build_train_loader(cfg, 0, 1, seed=3)
        batches.append(list(itertools.islice(iter(loader), 3)))
    for a, b in zip(*batches, strict=True):
        assert a["case_id"] == b["case_id"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
