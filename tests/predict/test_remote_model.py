"""Models in a bucket (`distseg.inference.remote`) on a real S3 server on loopback (moto, tests/s3server.py): a run
uploaded as `run.output_root=s3://...` leaves it, a half-uploaded newer tag, a cross-validation folder, an exported
model; `launch/predict.py` and `launch/evaluate.py --model s3://... --store s3://...` give what the local paths give."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import nibabel as nib
import numpy as np
import pytest
import torch

from distseg.core import checkpoint
from distseg.inference.ensemble import load_models
from distseg.inference.loading import ModelLoadError, load_model
from distseg.inference.remote import fetch_model
from tests.predict.conftest import ok
from tests.s3server import BUCKET

PP = json.dumps({"rules": {"WT": {"keep_largest": True, "min_volume": 0.0}}}).encode()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DISTSEG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def _upload(client, folder: Path, prefix: str, skip: tuple[str, ...] = ()) -> None:
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not any(s in rel for s in skip):
            client.upload_file(str(p), BUCKET, f"{prefix}/{rel}")


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_in_the_bucket_loads_its_best_complete_checkpoint(s3, cache, brats_run):
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    _upload(client, brats_run, "out/runs/p3d")
    complete = checkpoint.complete_checkpoints(brats_run / "checkpoints")
    best = checkpoint.best_tag(complete) or complete[-1][1]
    newest = complete[-1][1]
    # a newer tag killed half-way through its upload: every file but the marker
    _upload(client, brats_run / "checkpoints" / newest, "out/runs/p3d/checkpoints/step_00099999", skip=("COMPLETE",))
    client.put_object(Bucket=BUCKET, Key="out/runs/p3d/postprocessing.json", Body=PP)

    url = f"s3://{BUCKET}/out/runs/p3d"
    local = fetch_model(url)
    assert local == cache / BUCKET / "out" / "runs" / "p3d"
    assert [t.tag for t in checkpoint.scan_tags(local / "checkpoints")] == [best]  # never the half-uploaded tag
    remote, here = load_model(url), load_model(brats_run)
    assert Path(remote.source).name == best == Path(here.source).name
    assert _same(_weights(remote), _weights(here))
    assert remote.postprocessing is not None  # the run's postprocessing.json came along

    # the cache keeps complete tags: a second fetch downloads no checkpoint file again
    s3.requests.clear()
    fetch_model(url)
    assert s3.count("GET", "/mp_rank") == 0 and s3.count("GET", "optim_states") == 0, s3.requests
    # ... and says what the bucket says: a postprocessing.json deleted there is not applied from the cache
    client.delete_object(Bucket=BUCKET, Key="out/runs/p3d/postprocessing.json")
    assert load_model(url).postprocessing is None


def test_a_cv_folder_and_a_tag_and_an_export_in_the_bucket(s3, cache, brats_run, export_cli, tmp_path):
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    for k in (0, 1):
        _upload(client, brats_run, f"cv/runs/fold_{k}")
    client.put_object(Bucket=BUCKET, Key="cv/ensemble.json", Body=json.dumps(
        {"format": "distseg-ensemble/1", "members": ["runs/fold_0", "runs/fold_1"]}).encode())
    client.put_object(Bucket=BUCKET, Key="cv/postprocessing.json", Body=PP)
    models = load_models([f"s3://{BUCKET}/cv"])
    assert len(models.members) == 2 and models.postprocessing is not None
    here = _weights(load_model(brats_run))
    assert all(_same(_weights(m), here) for m in models.members)

    tag = checkpoint.complete_checkpoints(brats_run / "checkpoints")[0][1]
    from_tag = load_model(f"s3://{BUCKET}/cv/runs/fold_0/checkpoints/{tag}")
    assert _same(_weights(from_tag), _weights(load_model(brats_run / "checkpoints" / tag)))

    ok(export_cli(brats_run, "--out", tmp_path / "export"))
    _upload(client, tmp_path / "export", "exported")
    assert _same(_weights(load_model(f"s3://{BUCKET}/exported/model.pt")), here)


def test_bad_model_urls_say_what_is_wrong(s3, cache):
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    with pytest.raises(ModelLoadError, match="not a model"):
        fetch_model(f"s3://{BUCKET}/nothing/here")
    with pytest.raises(ModelLoadError, match="bucket does not exist"):
        fetch_model("s3://no-such-bucket-distseg/runs/r")
    client.put_object(Bucket=BUCKET, Key="run/checkpoints/step_00000004/mp_rank_00_model_states.pt", Body=b"x")
    with pytest.raises(ModelLoadError, match="no complete checkpoint"):
        fetch_model(f"s3://{BUCKET}/run")
    client.put_object(Bucket=BUCKET, Key="cv2/ensemble.json", Body=json.dumps(
        {"format": "distseg-ensemble/1", "members": ["/abs/runs/fold_0"]}).encode())
    with pytest.raises(ModelLoadError, match="relative"):
        fetch_model(f"s3://{BUCKET}/cv2")
    with pytest.raises(ModelLoadError, match=r"'\.\.'"):
        fetch_model(f"s3://{BUCKET}/a/../../etc")
    with pytest.raises(ModelLoadError, match="no such object"):
        fetch_model(f"s3://{BUCKET}/missing/model.pt")


def test_predict_and_evaluate_from_and_into_the_bucket_equal_the_local_run(s3, cache, brats_run, brats_data,
                                                                            predict_cli, evaluate_cli, tmp_path):
    """Run, store and outputs in the bucket: the same files, predictions and metrics as the local run on the local
    store into a local folder."""
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    _upload(client, brats_run, "out/runs/p3d")
    _upload(client, brats_data[1], "stores/brats.zarr")
    run_url, store_url = f"s3://{BUCKET}/out/runs/p3d", f"s3://{BUCKET}/stores/brats.zarr"

    ok(predict_cli("--model", run_url, "--input", store_url, "--output", f"s3://{BUCKET}/preds", "--fold", "0"))
    ok(predict_cli("--model", brats_run, "--input", brats_data[1], "--output", tmp_path / "local", "--fold", "0"))
    local = sorted(p.name for p in (tmp_path / "local").iterdir() if not p.name.startswith("."))
    assert any(n.endswith(".nii.gz") for n in local), local
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="preds/").get("Contents", [])]
    assert sorted(k.removeprefix("preds/") for k in keys) == local
    for name in local:
        if name.endswith(".nii.gz"):
            client.download_file(BUCKET, f"preds/{name}", str(tmp_path / name))
            a = np.asarray(nib.load(tmp_path / "local" / name).dataobj)
            assert np.array_equal(a, np.asarray(nib.load(tmp_path / name).dataobj)), name

    ok(evaluate_cli("--model", run_url, "--store", store_url, "--output", f"s3://{BUCKET}/ev"))
    ok(evaluate_cli("--model", brats_run, "--store", brats_data[1], "--output", tmp_path / "ev_local"))
    remote = json.loads(client.get_object(Bucket=BUCKET, Key="ev/summary.json")["Body"].read())
    here = json.loads((tmp_path / "ev_local" / "summary.json").read_text())
    assert remote["cases"] == here["cases"] and here["cases"]


def test_an_unreachable_output_bucket_keeps_the_outputs_and_says_so(s3, cache, brats_run, brats_data, predict_cli):
    res = predict_cli("--model", brats_run, "--input", brats_data[1], "--output", "s3://no-such-bucket-distseg/p",
                      "--fold", "0")
    assert res.returncode == 3, res.stdout[-3000:]
    assert "bucket does not exist" in res.stdout and str(cache.parent / "outputs") in res.stdout
    assert list((cache.parent / "outputs" / "no-such-bucket-distseg" / "p").glob("*.nii.gz"))
