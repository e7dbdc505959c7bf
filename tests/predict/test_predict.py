"""`launch/predict.py`, `python -m distseg.inference.export` and `launch/evaluate.py --model` end to end, as a user
runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distseg.core.overlay import upscale_factor
from distseg.train.monitor import read_events
from tests.predict.conftest import PYTHON, ok, run_cmd

pytestmark = pytest.mark.slow

REAL_CASES = [("brats2018", "Brats18_CBICA_ABM_1", {0, 1, 2, 4}), ("brats2021", "BraTS2021_00006", {0, 1, 2, 4}),
              ("brats2023-naming", "BraTS-GLI-00001-000", {0, 1, 2, 3})]


BRATS_SOURCE_REGIONS = {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}
"""BraTS 2018-2021 source labels of each region (what the synthetic cases use)."""


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two bool masks; both empty = 1 (the BraTS convention the evaluator documents)."""
    denominator = int(pred.sum()) + int(gt.sum())
    return 1.0 if denominator == 0 else 2.0 * int((pred & gt).sum()) / denominator


def test_raw_nifti_and_store_give_the_same_voxels(brats_run, brats_data, predict_cli, tmp_path):
    raw, store = brats_data
    from_raw, from_store = tmp_path / "raw", tmp_path / "store"
    assert "8 cases" in predict_cli("--model", brats_run, "--input", raw, "--output", from_raw,
                                    "--tta", "mirror").stdout
    res = predict_cli("--model", brats_run, "--input", store, "--output", from_store, "--tta", "mirror")
    assert res.returncode == 0, res.stdout[-3000:]
    files = sorted(p.name for p in from_raw.glob("*.nii.gz"))
    assert len(files) == 8 and files == sorted(p.name for p in from_store.glob("*.nii.gz"))
    for name in files:
        np.testing.assert_array_equal(_labels(from_raw / name), _labels(from_store / name))
        case_id = name[: -len(".nii.gz")]
        src = nib.load(str(raw / case_id / f"{case_id}_flair.nii.gz"))
        out = nib.load(str(from_raw / name))
        assert out.shape == src.shape and np.allclose(out.affine, src.affine) and out.get_data_dtype() == np.uint8
        assert set(np.unique(_labels(from_raw / name)).tolist()) <= {0, 1, 2, 4}
        overlay = Image.open(from_raw / f"{case_id}_overlay.png")  # FLAIR | prediction | ground truth (seg given)
        assert overlay.mode == "RGB" and overlay.size[0] >= 3 * 480 and overlay.size[1] > 480


@pytest.mark.parametrize("release,case_id,convention", REAL_CASES)
def test_real_cases_geometry_header_convention_and_brain_box(brats_run, shared_data, predict_cli, tmp_path, release,
                                                             case_id, convention):
    """Real scans: output grid, affine and header equal the input's; labels in the input's convention; nothing
    outside the brain box; the store path gives the same voxels (raw NIfTI == store)."""
    from preprocess.brats import brats_root_attrs, convert_brats_case
    from preprocess.discover import discover_brats
    from preprocess.writer import Layout, init_store

    case_dir = tmp_path / "in" / case_id
    shutil.copytree(shared_data / release / case_id, case_dir)
    out = tmp_path / "out"
    res = predict_cli("--model", brats_run, "--input", case_dir, "--output", out, "--window-batch", "8")
    assert res.returncode == 0, res.stdout[-3000:]
    pred = nib.load(str(out / f"{case_id}.nii.gz"))
    flair = next(case_dir.glob("*flair.nii.gz")) if release != "brats2023-naming" else next(case_dir.glob("*t2f*"))
    src = nib.load(str(flair))
    assert pred.shape == src.shape == (240, 240, 155)
    np.testing.assert_allclose(pred.affine, src.affine)
    for key in ("qform_code", "sform_code", "pixdim", "xyzt_units"):
        np.testing.assert_array_equal(pred.header[key], src.header[key])
    assert pred.get_data_dtype() == np.uint8
    labels = _labels(out / f"{case_id}.nii.gz")
    assert set(np.unique(labels).tolist()) <= convention
    brain = np.zeros(src.shape, dtype=bool)
    for f in case_dir.glob("*.nii.gz"):
        if "seg" not in f.name:
            brain |= np.asarray(nib.load(str(f)).dataobj) != 0
    box = tuple(slice(idx.min(), idx.max() + 1) for idx in np.nonzero(brain))
    outside = np.ones(src.shape, dtype=bool)
    outside[box] = False
    assert not labels[outside].any()
    # The same case converted into a store predicts the same voxels.
    store = tmp_path / "s.zarr"
    init_store(store, brats_root_attrs())
    row = convert_brats_case(discover_brats(case_dir.parent)[0], store, 0, Layout())
    assert row["status"] == "ok", row["error"]
    res = predict_cli("--model", brats_run, "--input", store, "--output", tmp_path / "from_store",
                      "--window-batch", "8")
    assert res.returncode == 0, res.stdout[-3000:]
    np.testing.assert_array_equal(_labels(tmp_path / "from_store" / f"{case_id}.nii.gz"), labels)


def test_export_round_trip_zero3_checkpoint_and_onnx(brats_run_zero3, brats_data, predict_cli, export_cli, tmp_path):
    """A 2-rank ZeRO-3 checkpoint -> export -> predict equals predicting from the checkpoint; ONNX ~ torch."""
    _, store = brats_data
    tag = sorted((brats_run_zero3 / "checkpoints").glob("step_*"))[-1]
    ok_ckpt = predict_cli("--model", tag, "--input", store, "--output", tmp_path / "ckpt", "--fold", "0")
    assert ok_ckpt.returncode == 0, ok_ckpt.stdout[-3000:]
    res = export_cli(brats_run_zero3, "--out", tmp_path / "exp", "--onnx")
    assert res.returncode == 0, res.stdout[-3000:]
    assert {p.name for p in (tmp_path / "exp").iterdir()} >= {"model.pt", "model.yaml", "model.onnx"}
    import torch

    state = torch.load(tmp_path / "exp" / "model.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    for name, model in (("pt", "model.pt"), ("onnx", "model.onnx")):
        r = predict_cli("--model", tmp_path / "exp" / model, "--input", store, "--output", tmp_path / name,
                        "--fold", "0")
        assert r.returncode == 0, r.stdout[-3000:]
    names = sorted(p.name for p in (tmp_path / "ckpt").glob("*.nii.gz"))
    assert names
    for n in names:
        np.testing.assert_array_equal(_labels(tmp_path / "pt" / n), _labels(tmp_path / "ckpt" / n))
        agree = np.mean(_labels(tmp_path / "onnx" / n) == _labels(tmp_path / "ckpt" / n))
        assert agree > 0.999, f"{n}: ONNX and torch labels agree on only {agree:.5f} of the voxels"


def test_bad_inputs_are_named_and_the_good_cases_still_predicted(brats_run, brats_data, predict_cli, export_cli,
                                                                  tmp_path):
    raw, _ = brats_data
    src = tmp_path / "in"
    cases = sorted(p.name for p in raw.iterdir())
    for c in cases[:4]:
        shutil.copytree(raw / c, src / c)
    good, missing, mismatched, notnifti = cases[:4]
    (src / missing / f"{missing}_t1ce.nii.gz").unlink()
    other = nib.load(str(src / mismatched / f"{mismatched}_t2.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.int16), other.affine), str(src / mismatched /
                                                                                   f"{mismatched}_t2.nii.gz"))
    (src / notnifti / f"{notnifti}_flair.nii.gz").write_bytes(b"\x1f\x8b" + b"not a nifti at all" * 10)
    out = tmp_path / "out"
    res = predict_cli("--model", brats_run, "--input", src, "--output", out)
    assert res.returncode == 3, res.stdout[-3000:]
    assert (out / f"{good}.nii.gz").is_file()
    for cid, words in ((missing, "missing modality t1ce"), (mismatched, "differs from"), (notnifti, "gzip")):
        line = next((ln for ln in res.stdout.splitlines() if f"FAILED {cid}" in ln), "")
        assert words in line and "expected" in line, res.stdout[-3000:]
        assert not (out / f"{cid}.nii.gz").exists()
    # A checkpoint of another model, a truncated weights file, an unwritable output, an empty input folder.
    assert export_cli(brats_run, "--out", tmp_path / "exp").returncode == 0
    doc = (tmp_path / "exp" / "model.yaml").read_text()
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    shutil.copy(tmp_path / "exp" / "model.pt", wrong / "model.pt")
    (wrong / "model.yaml").write_text(doc.replace("preset: debug", "preset: default"))
    res = predict_cli("--model", wrong / "model.pt", "--input", src / good, "--output", tmp_path / "o1")
    assert res.returncode == 2 and "do not fit model 'unet3d'" in res.stdout, res.stdout[-2000:]
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    data = (tmp_path / "exp" / "model.pt").read_bytes()
    (trunc / "model.pt").write_bytes(data[: len(data) // 2])
    (trunc / "model.yaml").write_text(doc)
    res = predict_cli("--model", trunc / "model.pt", "--input", src / good, "--output", tmp_path / "o2")
    assert res.returncode == 2 and f"{trunc / 'model.pt'}: unreadable weights file" in res.stdout
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = predict_cli("--model", brats_run, "--input", src / good, "--output", blocker / "out")
    assert res.returncode == 2 and "cannot create the output folder" in res.stdout
    (tmp_path / "empty").mkdir()
    res = predict_cli("--model", brats_run, "--input", tmp_path / "empty", "--output", tmp_path / "o3")
    assert res.returncode == 2 and "no BraTS case found" in res.stdout
    res = predict_cli("--model", brats_run, "--input", src, "--output", src / "preds")
    assert res.returncode == 2 and "inside the input folder" in res.stdout


def test_two_ranks_split_the_cases(brats_run, brats_data, predict_launcher, tmp_path):
    raw, _ = brats_data
    res = predict_launcher("--model", brats_run, "--input", raw, "--output", tmp_path / "out")
    assert res.returncode == 0, res.stdout[-3000:]
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 8
    assert "rank 0: 4 cases predicted" in res.stdout and "rank 1: 4 cases predicted" in res.stdout


def test_evaluate_model_chooses_postprocessing_and_logs_to_tensorboard(brats_run, brats_data, evaluate_cli,
                                                                       predict_cli, tmp_path):
    raw, store = brats_data
    out = tmp_path / "eval"
    before = {p.name for p in brats_run.iterdir()}
    res = evaluate_cli("--model", brats_run, "--store", store, "--output", out, "--choose-postprocessing")
    assert res.returncode == 0, res.stdout[-3000:]
    meta = json.loads((out / "evaluation.json").read_text())
    assert meta["model"]["name"] == "unet3d" and meta["role"] == "validation" and meta["sources"]["folds"] == "[0]"
    # Every case of the run's validation fold is scored, and each score is what its written prediction earns
    # against the source label map (recomputed here from the files, not read back from the evaluator).
    from distseg.data.store import Store

    cases = Store.open(store).case_ids(folds=[0], labelled_only=True)
    assert meta["n_cases"] == len(cases) >= 1
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert sorted({r["case_id"] for r in rows}) == cases and {r["region"] for r in rows} == {"WT", "TC", "ET"}
    assert sorted(p.name for p in (out / "predictions").glob("*.nii.gz")) == [f"{c}.nii.gz" for c in cases]
    for case_id in cases:
        gt_img = nib.load(str(raw / case_id / f"{case_id}_seg.nii.gz"))
        pred_img = nib.load(str(out / "predictions" / f"{case_id}.nii.gz"))
        assert pred_img.shape == gt_img.shape and np.allclose(pred_img.affine, gt_img.affine)
        pred, gt = _labels(out / "predictions" / f"{case_id}.nii.gz"), np.asarray(gt_img.dataobj)
        assert set(np.unique(pred).tolist()) <= {0, 1, 2, 4}
        for region, values in BRATS_SOURCE_REGIONS.items():
            row = next(r for r in rows if r["case_id"] == case_id and r["region"] == region)
            assert row["status"] == "ok", row
            assert row["dice"] == pytest.approx(_dice(np.isin(pred, values), np.isin(gt, values)), abs=1e-9), row
    summary = (out / "summary.md").read_text()
    for region in ("WT", "TC", "ET"):
        mean = np.mean([r["dice"] for r in rows if r["region"] == region])
        assert f"| {region} | Dice | {mean:.4f} |" in summary, (region, mean, summary)
    with Image.open(out / "boxplot_dice.png") as plot:
        assert plot.size[0] >= 300 and plot.size[1] >= 200 and len(plot.convert("RGB").getcolors(1 << 20)) > 8
    # The chosen rule is written to the output folder only (never beside the model as a side effect), and
    # --postprocess FILE applies exactly that rule to the prediction.
    assert {p.name for p in brats_run.iterdir()} == before and not (brats_run / "postprocessing.json").exists()
    chosen = json.loads((out / "postprocessing.json").read_text())
    assert set(chosen) >= {"rules", "candidates"} and {c["region"] for c in chosen["candidates"]} == {"WT", "TC", "ET"}
    events = read_events(brats_run / "tb")
    assert "eval/dice/WT" in events and "eval/summary/text_summary" in events
    from distseg.evaluation.scoring import default_regions, region_masks
    from distseg.inference.postprocess import DEFAULT_THRESHOLD, Postprocessing, postprocess

    # The chosen component rules at the default threshold, so that the 0.5 masks written above are their input
    # (chosen thresholds are applied to probabilities: tests/predict/test_thresholds.py).
    rule = Postprocessing.from_dict(chosen["rules"])
    for r in rule.rules.values():
        r.threshold = DEFAULT_THRESHOLD
    (tmp_path / "rules.json").write_text(json.dumps({"rules": rule.to_dict()}))
    res = predict_cli("--model", brats_run, "--input", store, "--output", tmp_path / "pp", "--postprocess",
                      tmp_path / "rules.json")
    assert res.returncode == 0, res.stdout[-3000:]
    for case_id in cases:
        plain = region_masks(_labels(out / "predictions" / f"{case_id}.nii.gz"), "brats2018")
        spacing = nib.load(str(out / "predictions" / f"{case_id}.nii.gz")).header.get_zooms()
        want = postprocess(plain, default_regions("brats2018"), rule, spacing)
        np.testing.assert_array_equal(region_masks(_labels(tmp_path / "pp" / f"{case_id}.nii.gz"), "brats2018"), want)


def test_zero0_bf16_checkpoint_exports_the_fp32_master_weights(images_run):
    """ZeRO 0 + bf16 keeps bf16 module weights and fp32 masters in the optimizer: the export must take the masters."""
    import torch

    from distseg.core.checkpoint import consolidated_fp32_state

    tag = sorted((images_run / "checkpoints").glob("step_*"))[-1]
    state = consolidated_fp32_state(tag)
    saved = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    weights = [k for k, v in saved.items() if v.dtype == torch.bfloat16 and v.dim() > 1]
    assert weights
    for k in weights:
        assert state[k].dtype == torch.float32
        torch.testing.assert_close(state[k].bfloat16(), saved[k], atol=0, rtol=0.01)
    assert any(not torch.equal(state[k], state[k].bfloat16().float()) for k in weights)  # real fp32 precision


def test_2d_masks_and_overlays_at_the_input_size(images_run, images_data, predict_cli, evaluate_cli, tmp_path):
    raw, store = images_data
    out = tmp_path / "out"
    res = predict_cli("--model", images_run, "--input", raw, "--output", out, "--tta", "mirror")
    assert res.returncode == 0, res.stdout[-3000:]
    masks = sorted(out.glob("*_mask.png"))
    assert len(masks) == 8
    for m in masks:
        case_id = m.name[: -len("_mask.png")]
        src = next(p for p in raw.rglob(f"{case_id}.*") if "_mask" not in p.name)
        mask = np.asarray(Image.open(m))
        assert mask.shape == Image.open(src).size[::-1]
        assert set(np.unique(mask).tolist()) <= {0, 255}  # the synthetic masks are 0/255: same convention back
        # image | prediction | ground truth (the mask beside the image), each >= 480 px, at the source's aspect
        overlay = Image.open(out / f"{case_id}_overlay.png")
        w, h = Image.open(src).size
        k = upscale_factor(h, w)
        assert overlay.mode == "RGB" and overlay.size[0] == 3 * w * k + 2 * 4 and overlay.size[1] > h * k >= 480
    # raw images == store, and the masks evaluate against the source masks
    res = predict_cli("--model", images_run, "--input", store, "--output", tmp_path / "s", "--tta", "mirror")
    assert res.returncode == 0
    for m in masks:
        np.testing.assert_array_equal(np.asarray(Image.open(m)), np.asarray(Image.open(tmp_path / "s" / m.name)))
    res = evaluate_cli("--pred", out, "--gt", raw, "--output", tmp_path / "eval")
    assert res.returncode == 0, res.stdout[-3000:]
    rows = pq.read_table(tmp_path / "eval" / "metrics.parquet").to_pylist()
    assert sorted(r["case_id"] for r in rows) == sorted(m.name[: -len("_mask.png")] for m in masks)
    for r in rows:  # each score is the Dice of the written mask against the source mask
        pred = np.asarray(Image.open(out / f"{r['case_id']}_mask.png")) > 0
        gt = np.asarray(Image.open(raw / "masks" / f"{r['case_id']}.png")) > 0
        assert r["status"] == "ok" and r["dice"] == pytest.approx(_dice(pred, gt), abs=1e-9), r



def test_subject_postprocessing_sees_a_patients_slices_in_predict_and_evaluate(images_run, images_data, predict_cli,
                                                                               predict_launcher, evaluate_cli,
                                                                               tmp_path):
    """A "subject" rule acts on a patient's slices stacked, in `launch/predict.py` (on 2 ranks: a patient's slices
    stay on one rank) and in `launch/evaluate.py --postprocess`. The trained debug model with its head's bias raised
    by 1000 calls every pixel tumour (an exported model: real weights, known answer); one image is copied to slices
    1-4 and 6 of a patient. "Remove components below (one slice's pixels + 1)" empties every slice judged alone,
    but over the stack slices 1-4 join into one component and slice 6, past the missing slice 5, stays alone."""
    import torch

    from distseg.inference.export import export
    from distseg.inference.postprocess import component_labels

    raw, _ = images_data
    model = export(images_run, tmp_path / "model")["weights"]
    state = torch.load(model, weights_only=True)
    state["head.bias"] += 1000.0
    torch.save(state, model)
    res = predict_cli("--model", model, "--input", raw, "--output", tmp_path / "plain")
    assert res.returncode == 0, res.stdout[-3000:]
    plain = {m.name[: -len("_mask.png")]: np.asarray(Image.open(m)) > 0
             for m in (tmp_path / "plain").glob("*_mask.png")}
    case_id = sorted(plain)[0]
    mask = plain[case_id]
    assert mask.all(), "the head's bias should make every pixel tumour"
    largest = int(component_labels(mask)[1].max())
    patient = tmp_path / "src" / "PAT"
    patient.mkdir(parents=True)
    for index in (1, 2, 3, 4, 6):
        shutil.copy(raw / "images" / f"{case_id}.png", patient / f"PAT_{index}.png")
        shutil.copy(raw / "masks" / f"{case_id}.png", patient / f"PAT_{index}_mask.png")
    rules = tmp_path / "pp.json"
    rules.write_text(json.dumps({"rules": {"tumour": {"min_volume": largest + 1, "scope": "subject"}}}))

    res = predict_launcher("--model", model, "--input", tmp_path / "src", "--output", tmp_path / "pp",
                           "--postprocess", rules)
    assert res.returncode == 0, res.stdout[-3000:]
    labels, sizes = component_labels(np.stack([mask] * 4))
    kept = np.concatenate([[False], sizes >= largest + 1])[labels][0]  # what each of slices 1-4 keeps
    assert kept.any()  # judged alone, every slice would be empty
    for index in (1, 2, 3, 4):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pp" / f"PAT_{index}_mask.png")) > 0, kept)
    assert not np.asarray(Image.open(tmp_path / "pp" / "PAT_6_mask.png")).any()

    # evaluate.py applies it the same way: the postprocessed scores are those of the masks predict.py wrote
    ok(run_cmd([PYTHON, "-m", "preprocess", "images2d", "--src", str(tmp_path / "src"), "--dst", str(tmp_path),
                "--name", "pat", "--serial", "--folds", "2"]))
    res = evaluate_cli("--model", model, "--store", tmp_path / "pat.zarr", "--postprocess", rules, "--output",
                       tmp_path / "eval")
    assert res.returncode == 0, res.stdout[-3000:]
    rows = {r["case_id"]: r for r in pq.read_table(tmp_path / "eval" / "postprocessed" / "metrics.parquet").to_pylist()}
    gt = np.asarray(Image.open(raw / "masks" / f"{case_id}.png")) > 0
    assert sorted(rows) == [f"PAT_{i}" for i in (1, 2, 3, 4, 6)]
    for index in (1, 2, 3, 4):
        assert rows[f"PAT_{index}"]["dice"] == pytest.approx(_dice(kept, gt), abs=1e-9)
    assert rows["PAT_6"]["dice"] == pytest.approx(_dice(np.zeros_like(gt), gt), abs=1e-9)


def test_a_downsampled_model_trains_validates_and_predicts_at_full_resolution(brats_data, train_cli, predict_cli,
                                                                              tmp_path):
    """data.downsample=2 end to end: pooled training batches, whole-case validation and prediction interpolate the
    logits back, so outputs are on the input's own grid."""
    raw, store = brats_data
    res = train_cli("--config", "configs/debug.yaml", f"data.store={store}", f"run.output_root={tmp_path}",
                    "run.name=ds2", "data.downsample=2", "data.patch_size=[16,16,16]", "train.steps=4",
                    "train.val_every=4", "checkpoint.every=4")
    assert res.returncode == 0, res.stdout[-3000:]
    run_dir = tmp_path / "runs" / "ds2"
    state = json.loads(next((run_dir / "checkpoints").glob("step_*/trainer_state.json")).read_text())
    assert state["io"]["downsample"] == 2 and state["val_dice"] is not None
    res = predict_cli("--model", run_dir, "--input", raw, "--output", tmp_path / "out")
    assert res.returncode == 0, res.stdout[-3000:]
    for f in (tmp_path / "out").glob("*.nii.gz"):
        case_id = f.name[: -len(".nii.gz")]
        assert nib.load(str(f)).shape == nib.load(str(raw / case_id / f"{case_id}_t1.nii.gz")).shape
