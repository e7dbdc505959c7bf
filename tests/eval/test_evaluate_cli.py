"""`launch/evaluate.py` end to end on the real shared data: BraTS 2018 segs against themselves, a perturbed copy and
a wrong-grid file; plain label files with an inferred convention; 2D masks (lgg-tcga, figshare); bad usage; compare.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy import ndimage

from distseg.evaluation.report import case_schema
from distseg.evaluation.scoring import LESION_METRICS, METRICS
from tests.conftest import readme_label_counts

medpy_binary = pytest.importorskip("medpy.metric.binary", reason="medpy is a test-only dependency ([dev] extra)")

OUTPUTS = {"metrics.parquet", "metrics.csv", "summary.md", "summary.json", "evaluation.json",
           *(f"boxplot_{m}.png" for m in METRICS)}
BRATS_OUTPUTS = OUTPUTS | {f"boxplot_{m}.png" for m in LESION_METRICS}


def _seg(shared: Path, case: str) -> nib.Nifti1Image:
    return nib.load(shared / "brats2018" / case / f"{case}_seg.nii.gz")


def _save(data: np.ndarray, like: nib.Nifti1Image, path: Path) -> None:
    img = nib.Nifti1Image(data.astype(np.uint8), like.affine, like.header)
    img.set_data_dtype(np.uint8)
    nib.save(img, path)


def _rows(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["case_id"], r["region"]): r for r in pq.read_table(out / "metrics.parquet").to_pylist()}


def _check_files(out: Path, outputs: set[str] = OUTPUTS) -> None:
    assert {p.name for p in out.iterdir()} >= outputs
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    table = pq.read_table(out / "metrics.parquet")
    csv = pa_csv.read_csv(out / "metrics.csv", convert_options=pa_csv.ConvertOptions(
        column_types=case_schema(), strings_can_be_null=True))
    assert csv.to_pylist() == table.to_pylist()
    for m in METRICS:
        with Image.open(out / f"boxplot_{m}.png") as im:
            im.load()
            assert im.format == "PNG" and min(im.size) > 100


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_brats_identity_perturbed_and_wrong_grid(shared_data: Path, tmp_path: Path, run_evaluate) -> None:
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(shared_data / "brats2018/Brats18_CBICA_ABM_1/Brats18_CBICA_ABM_1_seg.nii.gz",
                pred / "Brats18_CBICA_ABM_1.nii.gz")  # the ground-truth file itself
    ref = _seg(shared_data, "Brats18_2013_3_1")  # int16 on disk; the prediction is written as uint8
    _save(np.asarray(ref.dataobj), ref, pred / "Brats18_2013_3_1.nii.gz")
    aop = _seg(shared_data, "Brats18_CBICA_AOP_1")
    label = np.asarray(aop.dataobj)
    grown = ndimage.binary_dilation(label > 0, iterations=2)  # whole tumour grown by 2 voxels as "edema"
    perturbed = label.copy()
    perturbed[grown & (label == 0)] = 2
    _save(perturbed, aop, pred / "Brats18_CBICA_AOP_1.nii.gz")
    amh = _seg(shared_data, "Brats18_CBICA_AMH_1")
    _save(np.asarray(amh.dataobj)[:, :, :150], amh, pred / "Brats18_CBICA_AMH_1.nii.gz")  # wrong grid
    before = _tree(pred)

    out = tmp_path / "eval"
    proc = run_evaluate("--pred", pred, "--gt", shared_data / "brats2018", "--output", out)
    assert proc.returncode == 3, proc.stderr
    assert "## Per case" in proc.stdout and "Brats18_CBICA_AMH_1" in proc.stdout
    _check_files(out, BRATS_OUTPUTS)
    rows = _rows(out)

    for region in ("WT", "TC", "ET"):  # a failed case: one row per region, scored Dice 0 / HD95 373.13
        failed = rows[("Brats18_CBICA_AMH_1", region)]
        assert failed["status"] == "failed"
        assert "Brats18_CBICA_AMH_1.nii.gz: shape (240, 240, 150) differs" in failed["error"]
        assert "Brats18_CBICA_AMH_1_seg.nii.gz" in failed["error"]
        assert (failed["dice"], failed["hd95"], failed["lesion_dice"], failed["lesion_hd95"]) == (0.0, 373.13, 0.0,
                                                                                                  374.0)
    counts = readme_label_counts(shared_data)  # an independent check of the volumes
    for case in ("Brats18_CBICA_ABM_1", "Brats18_2013_3_1"):
        c = counts[case]
        expected = {"WT": c[1] + c[2] + c[4], "TC": c[1] + c[4], "ET": c[4]}
        for region in ("WT", "TC", "ET"):
            r = rows[(case, region)]
            assert r["status"] == "ok" and r["label_convention"] == "brats2018"
            assert r["dice"] == 1.0 and r["hd95"] == 0.0 and r["fp"] == 0 and r["fn"] == 0
            assert r["gt_voxels"] == expected[region] and r["gt_ml"] == pytest.approx(expected[region] / 1000)
            assert r["lesion_dice"] == 1.0 and r["lesion_hd95"] == 0.0 and r["lesion_fp"] == r["lesion_fn"] == 0

    wt_gt, wt_pred = label > 0, grown
    wt = rows[("Brats18_CBICA_AOP_1", "WT")]
    assert wt["dice"] == pytest.approx(2 * wt_gt.sum() / (wt_gt.sum() + wt_pred.sum()))
    assert 0.5 < wt["dice"] < 1.0 and wt["recall"] == 1.0 and wt["precision"] < 1.0
    assert wt["hd95"] == pytest.approx(medpy_binary.hd95(wt_pred, wt_gt, voxelspacing=aop.header.get_zooms()))
    assert 1.0 <= wt["hd95"] <= 3.0  # grown by two voxels (surface to surface: up to sqrt(5) at corners), 1 mm
    for region in ("TC", "ET"):
        assert rows[("Brats18_CBICA_AOP_1", region)]["dice"] == 1.0

    meta = json.loads((out / "evaluation.json").read_text())
    n_gt = sum(1 for p in (shared_data / "brats2018").iterdir() if p.is_dir())
    # Every ground-truth case counts: the n_gt - 4 without a prediction are failed rows (Dice 0, HD95 373.13,
    # lesion-wise 0 / 374) inside the means, beside the one wrong-grid case.
    assert meta["kind"] == "brats3d" and meta["n_cases"] == n_gt and meta["n_failed"] == 1 + (n_gt - 4)
    assert len(meta["notes"]["no_prediction"]) == n_gt - 4
    missing = meta["notes"]["no_prediction"][0]
    for region in ("WT", "TC", "ET"):
        r = rows[(missing, region)]
        assert r["status"] == "failed" and f"no prediction for case {missing!r}" in r["error"]
        assert (r["dice"], r["hd95"], r["lesion_dice"], r["lesion_hd95"]) == (0.0, 373.13, 0.0, 374.0)
        assert r["gt_source"].endswith(f"{missing}_seg.nii.gz") and r["pred_source"] is None
    summary = json.loads((out / "summary.json").read_text())
    wt_dice = next(s for s in summary["cases"] if s["region"] == "WT" and s["metric"] == "dice")
    wt_rows = [r["dice"] for (_, region), r in rows.items() if region == "WT"]
    assert wt_dice["n"] == n_gt == len(wt_rows) and wt_dice["mean"] == pytest.approx(np.mean(wt_rows))
    assert f"{n_gt} counted, 3 scored, {n_gt - 3} failed ({n_gt - 4} without a prediction)" in proc.stdout
    assert _tree(pred) == before  # nothing written into --pred


def test_plain_label_files_infer_the_convention(shared_data: Path, tmp_path: Path, run_evaluate) -> None:
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    abm = _seg(shared_data, "Brats18_CBICA_ABM_1")
    label = np.asarray(abm.dataobj)
    as2023 = np.where(label == 4, 3, label)
    _save(as2023, abm, gt / "caseA.nii.gz")  # plain file, 2023 values -> brats2023 inferred
    _save(label, abm, gt / "caseB_seg.nii.gz")  # lone `_seg` file, 2018 values -> brats2018 inferred
    _save(as2023, abm, pred / "caseA.nii.gz")
    moved = np.roll(label, 3, axis=0)  # the whole label map shifted by 3 voxels along x
    _save(moved, abm, pred / "caseB.nii.gz")
    _save(label, abm, gt / "caseC.nii.gz")
    (pred / "caseC.nii.gz").write_bytes(b"not a NIfTI file")  # unreadable prediction
    _save(label, abm, gt / "caseD.nii.gz")
    _save(np.where(label == 2, 5, label), abm, pred / "caseD.nii.gz")  # a value no convention has
    out = tmp_path / "eval"
    proc = run_evaluate("--pred", pred, "--gt", gt, "--output", out)
    assert proc.returncode == 3, proc.stderr
    rows = _rows(out)
    assert "caseC.nii.gz: not gzip-compressed" in rows[("caseC", "WT")]["error"]
    assert "caseD.nii.gz: label values [5] outside the brats2018 convention" in rows[("caseD", "ET")]["error"]
    assert {r["label_convention"] for k, r in rows.items() if k[0] == "caseA"} == {"brats2023"}
    assert rows[("caseA", "ET")]["dice"] == 1.0 and rows[("caseA", "ET")]["gt_voxels"] == 6159
    assert rows[("caseB", "ET")]["label_convention"] == "brats2018"
    assert rows[("caseB", "WT")]["hd95"] == pytest.approx(3.0, abs=0.5)  # shift of 3 voxels, 1 mm
    assert rows[("caseB", "WT")]["dice"] < 1.0


def _png(mask01: np.ndarray, path: Path, scale: int = 255) -> None:
    Image.fromarray((mask01 > 0).astype(np.uint8) * scale).save(path)


def test_images2d_lgg_and_figshare(shared_data: Path, tmp_path: Path, run_evaluate) -> None:
    lgg = shared_data / "seg2d" / "lgg-tcga"
    masks = {p.name[: -len("_mask.tif")]: np.asarray(Image.open(p)) > 127 for p in (lgg / "masks").glob("*.tif")}
    pred = tmp_path / "pred_lgg"
    pred.mkdir()
    tumour = "TCGA_DU_6399_19830416_17"
    eroded = ndimage.binary_erosion(masks[tumour], iterations=2)
    _png(eroded, pred / f"{tumour}_mask.png", scale=1)  # a 0/1 mask
    _png(masks["TCGA_CS_5396_20010302_5"], pred / "TCGA_CS_5396_20010302_5_mask.png")  # empty vs empty
    spurious = np.zeros((256, 256), bool)
    spurious[100:110, 40:60] = True
    _png(spurious, pred / "TCGA_DU_7018_19911220_31_mask.png")  # something where the GT is empty
    _png(np.zeros((128, 128), bool), pred / "TCGA_HT_7856_19950831_6_mask.png")  # wrong size
    out = tmp_path / "eval_lgg"
    proc = run_evaluate("--pred", pred, "--gt", lgg, "--output", out)
    assert proc.returncode == 3, proc.stderr
    _check_files(out)
    rows = _rows(out)
    t = rows[(tumour, "tumour")]
    g = masks[tumour]
    assert t["dice"] == pytest.approx(2 * (eroded & g).sum() / (eroded.sum() + g.sum()))
    assert t["hd95"] == pytest.approx(medpy_binary.hd95(eroded, g))  # pixels: no spacing for 2D images
    assert t["gt_voxels"] == 1426 and t["gt_ml"] is None
    empty = rows[("TCGA_CS_5396_20010302_5", "tumour")]
    assert empty["dice"] == 1.0 and empty["hd95"] == 0.0
    wrong = rows[("TCGA_DU_7018_19911220_31", "tumour")]
    assert wrong["dice"] == 0.0 and wrong["hd95"] == 373.13 and wrong["pred_voxels"] == 200
    failed = rows[("TCGA_HT_7856_19950831_6", "tumour")]
    assert failed["status"] == "failed" and "size (128, 128) differs" in failed["error"]
    assert failed["dice"] == 0.0 and failed["hd95"] == 373.13 and failed["lesion_dice"] is None  # no lesion-wise in 2D
    meta = json.loads((out / "evaluation.json").read_text())
    assert meta["kind"] == "images2d" and meta["hd95_unit"] == "px" and meta["regions"] == ["tumour"]

    # figshare (X.png + X_mask.png side by side, RGBA masks): every mask against itself, two worker processes.
    fig = shared_data / "seg2d" / "figshare-cheng"
    pred_fig = tmp_path / "pred_fig"
    pred_fig.mkdir()
    for mask in fig.glob("*_mask.png"):
        shutil.copy(mask, pred_fig / mask.name)
    out_fig = tmp_path / "eval_fig"
    proc = run_evaluate("--pred", pred_fig, "--gt", fig, "--output", out_fig, "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    rows = _rows(out_fig)
    assert len(rows) == 6 and all(r["dice"] == 1.0 and r["hd95"] == 0.0 for r in rows.values())
    assert all(r["label_convention"] == "binary255" for r in rows.values())

    # compare the two 2D evaluations (and write the table to a file).
    table_md = tmp_path / "tables" / "compare.md"
    proc = run_evaluate("compare", out, out_fig, "--output", table_md)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == table_md.read_text()
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("| Model | Dice | IoU | Pixel accuracy | Precision | Recall | Parameters |")
    assert any(line.startswith("| eval_lgg |") for line in lines)
    assert any(line.startswith("| eval_fig | 1.000 ± 0.000 | 1.000 ± 0.000 |") for line in lines)


def test_bad_usage_exits_2(shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # In-process (the same `main` the script runs): five interpreter start-ups would cost more than the checks.
    from launch.evaluate import main

    def run(*args: str | Path) -> tuple[int, str]:
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="launch.evaluate"):
            code = main([str(a) for a in args])
        return code, caplog.text

    pred = tmp_path / "pred"
    pred.mkdir()
    code, err = run("--pred", pred, "--gt", tmp_path / "missing", "--output", tmp_path / "o1")
    assert code == 2 and "--gt" in err and "missing: no such folder" in err
    code, err = run("--pred", pred, "--gt", shared_data / "brats2018", "--output", tmp_path / "o2")
    n_gt = sum(1 for p in (shared_data / "brats2018").iterdir() if p.is_dir())
    assert code == 2 and f"no prediction pairs with the {n_gt} ground-truth cases" in err and "<case_id>.nii.gz" in err
    code, err = run("--pred", pred, "--gt", tmp_path / "pred", "--output", tmp_path / "o3")
    assert code == 2 and "no ground truth found" in err
    code, err = run("--pred", pred, "--gt", shared_data / "brats2018", "--output", pred / "out")
    assert code == 2 and "inside --pred" in err and not (pred / "out").exists()
    code, err = run("--pred", pred, "--gt", shared_data / "brats2018", "--output", tmp_path / "o4", "--workers", "0")
    assert code == 2 and "--workers 0" in err
    code, err = run("compare", tmp_path / "o2")
    assert code == 2 and "evaluation.json" in err
