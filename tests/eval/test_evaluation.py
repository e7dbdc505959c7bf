"""The evaluation library on synthetic arrays: region masks, per-case rows, per-subject stacking, output files,
TensorBoard entry and the side-by-side comparison."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distseg.evaluation import (
    CaseFailure,
    EvaluationMeta,
    ModelInfo,
    ScoredCase,
    compare,
    evaluate_arrays,
    evaluate_case,
    infer_brats_convention,
    log_evaluation,
    read_evaluation_meta,
    region_masks,
    subject_metrics,
)
from distseg.evaluation.lesionwise import lesion_wise
from distseg.evaluation.report import case_schema
from distseg.evaluation.scoring import LESION_METRICS, METRICS, failed_rows
from distseg.train.monitor import read_events

BRATS = ["WT", "TC", "ET"]


# ------------------------------------------------------------------------------------------------ region masks
@pytest.mark.parametrize(("convention", "enhancing"), [("brats2018", 4), ("brats2023", 3)])
def test_region_masks_brats(convention: str, enhancing: int) -> None:
    label = np.array([[0, 1], [2, enhancing]], dtype=np.int16)
    wt, tc, et = region_masks(label, convention)
    assert wt.tolist() == [[False, True], [True, True]]
    assert tc.tolist() == [[False, True], [False, True]]
    assert et.tolist() == [[False, False], [False, True]]


def test_region_masks_binary_and_errors() -> None:
    assert region_masks(np.array([0, 255, 255], np.uint8), "binary255").tolist() == [[False, True, True]]
    assert region_masks(np.array([0, 1], np.uint8), "binary01").tolist() == [[False, True]]
    with pytest.raises(ValueError, match=r"seg\.nii\.gz: label values \[3\] outside the brats2018"):
        region_masks(np.array([0, 1, 3]), "brats2018", what="seg.nii.gz")
    with pytest.raises(ValueError, match=r"label values \[4\] outside the brats2023"):
        region_masks(np.array([0, 4]), "brats2023")
    with pytest.raises(ValueError, match=r"\[1\] outside the binary255"):
        region_masks(np.array([0, 1, 255]), "binary255")
    with pytest.raises(ValueError, match="non-integer"):
        region_masks(np.array([0.0, 1.5]), "brats2018")
    with pytest.raises(ValueError, match=r"\[-1\] outside 0..255"):
        region_masks(np.array([0, -1]), "brats2018")
    with pytest.raises(ValueError, match="unknown label convention"):
        region_masks(np.array([0]), "brats1999")


def test_infer_brats_convention() -> None:
    assert infer_brats_convention(np.array([0, 1, 4]), np.array([0, 2])) == "brats2018"
    assert infer_brats_convention(np.array([0, 3])) == "brats2023"
    assert infer_brats_convention(np.array([0, 1, 2])) == "brats2018"  # no ET label: regions equal either way
    with pytest.raises(ValueError, match="both 3 and 4"):
        infer_brats_convention(np.array([0, 3]), np.array([4]))


# ------------------------------------------------------------------------------------------------ per case
def test_evaluate_case_counts_volumes_and_errors(rng: np.random.Generator) -> None:
    pred = rng.random((3, 5, 6, 7)) < 0.3
    gt = rng.random((3, 5, 6, 7)) < 0.3
    rows = evaluate_case(pred, gt, (2.0, 1.0, 0.5), BRATS, case_id="c1", subject="p1")
    assert [r["region"] for r in rows] == BRATS
    for k, row in enumerate(rows):
        p, g = pred[k], gt[k]
        assert (row["tp"], row["fp"], row["fn"], row["tn"]) == ((p & g).sum(), (p & ~g).sum(), (~p & g).sum(),
                                                                (~p & ~g).sum())
        assert row["pred_voxels"] == p.sum() and row["gt_voxels"] == g.sum()
        assert row["pred_ml"] == pytest.approx(p.sum() * 1.0 / 1000) and row["gt_ml"] == pytest.approx(g.sum() / 1e3)
        assert row["dice"] == pytest.approx(2 * (p & g).sum() / (p.sum() + g.sum()))
        assert row["case_id"] == "c1" and row["subject"] == "p1" and row["status"] == "ok" and row["error"] is None
        assert row["lesion_dice"] is None and row["lesion_fp"] is None  # not asked for
    for k, row in enumerate(evaluate_case(pred, gt, (2.0, 1.0, 0.5), BRATS, lesion_wise_metrics=True)):
        lw = lesion_wise(pred[k], gt[k], (2.0, 1.0, 0.5))
        assert (row["lesion_dice"], row["lesion_hd95"]) == (lw.dice, lw.hd95)
        assert (row["lesion_tp"], row["lesion_fn"], row["lesion_fp"]) == (lw.tp, lw.fn, lw.fp)
    (px,) = evaluate_case(pred[:1, 0], gt[:1, 0], None, ["tumour"])
    assert px["pred_ml"] is None and px["gt_ml"] is None and math.isfinite(px["hd95"])
    with pytest.raises(ValueError, match="'c2'.*must have one shape"):
        evaluate_case(pred, gt[:2], None, BRATS, case_id="c2")
    with pytest.raises(ValueError, match="2 region names"):
        evaluate_case(pred, gt, None, ["WT", "TC"])
    with pytest.raises(ValueError, match="spacing"):
        evaluate_case(pred, gt, (1.0, 1.0), BRATS)


def test_subject_metrics_equal_the_stacked_volume(rng: np.random.Generator) -> None:
    rows, slices = [], {"p1": [], "p2": []}
    for i in range(7):
        subject = "p1" if i % 2 else "p2"
        pred = rng.random((1, 8, 9)) < rng.uniform(0, 0.4)
        gt = rng.random((1, 8, 9)) < (0.3 if i != 3 else 0.0)
        slices[subject].append((pred, gt))
        rows += evaluate_case(pred, gt, None, ["tumour"], case_id=f"s{i}", subject=subject)
    rows += evaluate_case(np.ones((1, 2, 2), bool), np.ones((1, 2, 2), bool), None, ["tumour"], case_id="nosubj")
    # p3: one perfect slice and one failed slice -> the stacked volume is unknown: the subject scores 0.
    rows += evaluate_case(np.ones((1, 2, 2), bool), np.ones((1, 2, 2), bool), None, ["tumour"], case_id="p3a",
                          subject="p3")
    rows += failed_rows(CaseFailure("p3b", "unreadable", subject="p3"), ["tumour"])
    out = {r["subject"]: r for r in subject_metrics(rows)}
    assert set(out) == {"p1", "p2", "p3"}
    assert (out["p3"]["n_cases"], out["p3"]["n_failed"], out["p3"]["dice"], out["p3"]["tp"]) == (1, 1, 0.0, 4)
    assert out["p1"]["n_failed"] == 0
    for subject, pairs in slices.items():
        pred = np.concatenate([p for p, _ in pairs], axis=1)  # stacked (1, n*8, 9) volume
        gt = np.concatenate([g for _, g in pairs], axis=1)
        (stacked,) = evaluate_case(pred, gt, None, ["tumour"])
        for metric in ("dice", "iou", "precision", "recall", "specificity", "accuracy", "tp", "fn"):
            assert out[subject][metric] == pytest.approx(stacked[metric], rel=1e-12), (subject, metric)
        assert out[subject]["n_cases"] == len(pairs)
    assert subject_metrics([r for r in rows if r["subject"] is None]) == []


# ------------------------------------------------------------------------------------------------ outputs
def _brats_cases(rng: np.random.Generator, n: int = 4):
    for i in range(n):
        gt = np.zeros((3, 12, 13, 11), bool)
        gt[0, 2:9, 3:10, 2:8] = True
        gt[1, 3:7, 4:8, 3:6] = True
        gt[2, 4:6, 5:7, 4:5] = i != 2  # case 2: no ET in the ground truth
        pred = gt.copy()
        pred[0] |= rng.random(gt.shape[1:]) < 0.02 * i
        yield ScoredCase(f"case{i}", pred, gt, (1.0, 1.0, 2.0), pred_source=f"p/{i}.nii.gz",
                         gt_source=f"g/{i}.nii.gz", label_convention="brats2018")


def test_evaluate_arrays_writes_every_output(tmp_path: Path, rng: np.random.Generator) -> None:
    scored = list(_brats_cases(rng))
    cases = [*scored, CaseFailure("case9", "p/case9.nii.gz: shape (1, 2, 3) differs from g/...")]
    meta = EvaluationMeta(kind="brats3d", regions=BRATS, sources={"pred": "p", "gt": "g"},
                          model=ModelInfo(name="unet3d", parameters=31_200_000, run="runs/a", training_minutes=25.0))
    result = evaluate_arrays(iter(cases), tmp_path / "out", meta)
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert names == {"metrics.parquet", "metrics.csv", "summary.md", "summary.json", "evaluation.json",
                     *(f"boxplot_{m}.png" for m in (*METRICS, *LESION_METRICS))}  # no subjects table, no temp files
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert len(rows) == 5 * 3 and result.n_failed == 1  # the failed case: one row per region too
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["region"] for r in failed] == BRATS and all(r["case_id"] == "case9" for r in failed)
    for r in failed:  # the worst value of every metric (BraTS: Dice 0, HD95 373.13; lesion-wise 0 / 374)
        assert "shape" in r["error"] and r["tp"] is None and r["gt_voxels"] is None and r["lesion_fp"] is None
        assert (r["dice"], r["iou"], r["recall"], r["specificity"], r["hd95"]) == (0.0, 0.0, 0.0, 0.0, 373.13)
        assert (r["lesion_dice"], r["lesion_hd95"]) == (0.0, 374.0)
    # Lesion-wise columns of the scored rows: those of `lesion_wise` on the case's masks.
    for case in scored:
        for k, region in enumerate(BRATS):
            row = next(r for r in rows if r["case_id"] == case.case_id and r["region"] == region)
            lw = lesion_wise(case.pred[k], case.gt[k], case.spacing)
            assert (row["lesion_dice"], row["lesion_hd95"], row["lesion_tp"], row["lesion_fn"], row["lesion_fp"]) == (
                lw.dice, lw.hd95, lw.tp, lw.fn, lw.fp)
    wt3 = next(r for r in rows if r["case_id"] == "case3" and r["region"] == "WT")
    assert wt3["lesion_fp"] > 0 and wt3["lesion_dice"] < wt3["dice"]  # scattered false positives: lesion-wise bites
    # CSV holds the same table as Parquet.
    csv = pa_csv.read_csv(out / "metrics.csv", convert_options=pa_csv.ConvertOptions(
        column_types=case_schema(), strings_can_be_null=True))
    assert csv.to_pylist() == rows
    # Summary statistics = numpy over every row (the failed case counted with its worst values), per region and metric.
    summary = json.loads((out / "summary.json").read_text())
    assert {s["metric"] for s in summary["cases"]} == {*METRICS, *LESION_METRICS}
    for s in summary["cases"]:
        values = np.array([r[s["metric"]] for r in rows if r["region"] == s["region"]])
        assert s["n"] == 5
        assert s["mean"] == pytest.approx(values.mean()) and s["std"] == pytest.approx(values.std())
        assert s["median"] == pytest.approx(np.median(values))
        assert s["q25"] == pytest.approx(np.percentile(values, 25))
    et = {r["case_id"]: r for r in rows if r["region"] == "ET"}
    assert et["case2"]["dice"] == 1.0 and et["case2"]["hd95"] == 0.0  # both empty: BraTS convention
    assert summary["failed"] == [{"case_id": "case9", "error": failed[0]["error"]}]
    md = (out / "summary.md").read_text()
    assert md == result.markdown
    assert "unet3d" in md and "case9" in md and "373.13" in md and "| WT | Dice |" in md
    assert "| WT | Lesion-wise Dice |" in md and "| ET | Lesion-wise HD95 (mm) |" in md
    assert "5 counted, 4 scored, 1 failed" in md and "Every case counts" in md
    meta_back = read_evaluation_meta(out)
    assert meta_back.n_cases == 5 and meta_back.n_failed == 1 and meta_back.model.parameters == 31_200_000
    assert meta_back.label_conventions == ["brats2018"] and meta_back.hd95_unit == "mm"
    assert "HD95" in json.loads((out / "evaluation.json").read_text())["conventions"]
    for m in METRICS:
        with Image.open(out / f"boxplot_{m}.png") as im:
            im.load()
            assert im.format == "PNG" and im.size[0] > 200


def test_workers_give_the_same_rows(tmp_path: Path, rng: np.random.Generator) -> None:
    cases = list(_brats_cases(rng, 3))
    meta = EvaluationMeta(kind="brats3d", regions=BRATS)
    one = evaluate_arrays(cases, tmp_path / "w1", meta)
    two = evaluate_arrays(cases, tmp_path / "w2", EvaluationMeta(kind="brats3d", regions=BRATS), workers=2)
    assert one.rows == two.rows


def test_subject_table_written_when_cases_have_subjects(tmp_path: Path, rng: np.random.Generator) -> None:
    cases = [ScoredCase(f"s{i}", rng.random((1, 6, 6)) < 0.4, rng.random((1, 6, 6)) < 0.4, None,
                        subject=f"patient{i % 2}") for i in range(6)]
    result = evaluate_arrays(cases, tmp_path, EvaluationMeta(kind="images2d", regions=["tumour"], hd95_unit="px"))
    subjects = pq.read_table(tmp_path / "subjects.parquet").to_pylist()
    assert [s["subject"] for s in subjects] == ["patient0", "patient1"] and subjects == result.subject_rows
    assert (tmp_path / "subjects.csv").is_file()
    assert "Per subject (2 subjects" in result.markdown and "HD95 (px)" in result.markdown


def test_log_evaluation_writes_scalars_and_text(tmp_path: Path, rng: np.random.Generator) -> None:
    result = evaluate_arrays(list(_brats_cases(rng, 2)), tmp_path / "out", EvaluationMeta("brats3d", BRATS))
    log_evaluation(tmp_path / "tb", result.summary, step=120, text=result.markdown)
    events = read_events(tmp_path / "tb")
    wt_dice = next(s["mean"] for s in result.summary if s["region"] == "WT" and s["metric"] == "dice")
    assert events["eval/dice/WT"] == [(120, pytest.approx(wt_dice))]
    assert {f"eval/{m}/{r}" for m in METRICS for r in BRATS} <= set(events)
    (text,) = [v for tag, v in events.items() if tag.startswith("eval/summary")]
    assert text[0][0] == 120 and "## Per case" in text[0][1]


# ------------------------------------------------------------------------------------------------ compare
def _two_d_eval(path: Path, name: str, dice_pred_fraction: float, rng: np.random.Generator, params: int) -> None:
    cases = []
    for i in range(4):
        gt = np.zeros((1, 10, 10), bool)
        gt[0, 2:8, 2:8] = True
        pred = gt & (rng.random(gt.shape) < dice_pred_fraction)
        cases.append(ScoredCase(f"img{i}", pred, gt, None, subject=f"p{i % 2}"))
    evaluate_arrays(cases, path, EvaluationMeta("images2d", ["tumour"], hd95_unit="px",
                                                model=ModelInfo(name=name, parameters=params)))


def test_compare_tables(tmp_path: Path, rng: np.random.Generator) -> None:
    _two_d_eval(tmp_path / "a", "unet", 0.9, rng, 31_000_000)
    _two_d_eval(tmp_path / "b", "resnet50_unet", 0.5, rng, 30_500_000)
    table = compare([tmp_path / "a", tmp_path / "b"])
    lines = table.strip().splitlines()
    assert lines[0] == ("| Model | Dice | IoU | Pixel accuracy | Precision | Recall | Parameters | Per-patient Dice "
                        "| n |")
    for name, folder in (("unet", "a"), ("resnet50_unet", "b")):
        summary = json.loads((tmp_path / folder / "summary.json").read_text())
        stat = {s["metric"]: s for s in summary["cases"]}
        row = next(line for line in lines if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{stat['dice']['mean']:.3f} ± {stat['dice']['std']:.3f}"
        assert cells[5] == f"{stat['recall']['mean']:.3f} ± {stat['recall']['std']:.3f}"
        assert cells[-1] == "4"
    assert "| 31.0M |" in table and "| 30.5M |" in table
    # A 3D evaluation beside them: one table per kind.
    evaluate_arrays(list(_brats_cases(rng, 2)), tmp_path / "c", EvaluationMeta(
        "brats3d", BRATS, model=ModelInfo(name="unet3d")))
    mixed = compare([tmp_path / "a", tmp_path / "c", tmp_path / "b"])
    assert "### 2D segmentation" in mixed and "### BraTS (3D)" in mixed
    assert ("| Model | Region | Dice | Sensitivity | Specificity | HD95 (mm) | Lesion Dice | Lesion HD95 (mm) | n |"
            in mixed)
    c_summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    et_lesion = next(s for s in c_summary["cases"] if s["region"] == "ET" and s["metric"] == "lesion_hd95")
    et_row = next(line for line in mixed.splitlines() if line.startswith("| unet3d | ET |"))
    assert f"| {et_lesion['mean']:.2f} ± {et_lesion['std']:.2f} | 2 |" in et_row
    assert sum(line.startswith("| unet3d | ") for line in mixed.splitlines()) == 3
    with pytest.raises(ValueError, match=r"evaluation\.json"):
        compare([tmp_path / "nothing"])


def test_boxplot_png_decodes_from_bytes(tmp_path: Path, rng: np.random.Generator) -> None:
    evaluate_arrays(list(_brats_cases(rng, 2)), tmp_path, EvaluationMeta("brats3d", BRATS))
    data = (tmp_path / "boxplot_hd95.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.asarray(Image.open(io.BytesIO(data))).ndim == 3


def test_summary_skips_the_subject_table_when_each_subject_is_one_case(tmp_path: Path,
                                                                       rng: np.random.Generator) -> None:
    cases = [ScoredCase(f"s{i}", rng.random((1, 6, 6)) < 0.4, rng.random((1, 6, 6)) < 0.4, None,
                        subject=f"patient{i}") for i in range(3)]
    result = evaluate_arrays(cases, tmp_path, EvaluationMeta(kind="images2d", regions=["tumour"], hd95_unit="px"))
    assert "## Per subject" not in result.markdown  # it would repeat the per-case table
    assert len(pq.read_table(tmp_path / "subjects.parquet").to_pylist()) == 3  # the file is still written
