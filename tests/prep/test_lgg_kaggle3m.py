"""The LGG segmentation dataset in its published layout (../shared/data/seg2d/lgg-kaggle3m): one folder per patient,
`<patient>_<n>.tif` + `<patient>_<n>_mask.tif`. Subjects, per-subject folds, exact TIFF pixels, pairing, stacking a
patient back into a volume, and bad slices in a patient folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
import zarr

from distseg.data.store import Store
from preprocess.__main__ import main
from preprocess.common import FOLD_ASSIGNMENT, fold_of
from preprocess.discover import discover_images2d, slice_index_of
from tests.conftest import require_shared_data

FOLDS = 5


def _lgg(shared_data: Path) -> Path:
    return require_shared_data("seg2d/lgg-kaggle3m")


def _source_slices(src: Path) -> dict[str, dict[int, Path]]:
    """{patient folder: {slice index: image path}} straight from the file names."""
    out: dict[str, dict[int, Path]] = {}
    for p in sorted(src.glob("TCGA_*/*.tif")):
        if not p.stem.endswith("_mask"):
            out.setdefault(p.parent.name, {})[int(p.stem.rsplit("_", 1)[1])] = p
    return out


@pytest.fixture(scope="module")
def lgg(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Store, dict[str, dict]]:
    """The whole LGG folder converted once with the defaults (serial, no Ray): (source, store, manifest rows)."""
    src = _lgg(shared_data)
    dst = tmp_path_factory.mktemp("lgg")
    assert main(["images2d", "--src", str(src), "--dst", str(dst), "--name", "lgg", "--serial"]) == 0
    rows = {r["case_id"]: r for r in pq.read_table(dst / "lgg.manifest.parquet").to_pylist()}
    return src, Store.open(dst / "lgg.zarr"), rows


def test_every_slice_is_paired_and_converted(lgg):
    src, store, rows = lgg
    slices = _source_slices(src)
    n = sum(len(v) for v in slices.values())
    assert n == len(list(src.glob("*/*_mask.tif"))) > 0  # every image has its mask (the data grows: counted)
    assert len(rows) == n and {r["status"] for r in rows.values()} == {"ok"}
    assert len(store.case_ids()) == n
    for cid in store.case_ids():
        sources = store.case(cid).attrs["sources"]
        image, mask = Path(sources["image"]["path"]), Path(sources["mask"]["path"])
        assert image.name == f"{cid}.tif" and mask == image.with_name(f"{cid}_mask.tif")
    assert store.channels == ["r", "g", "b"]  # --channels auto: the three sequences differ
    assert store.attrs["fold_assignment"] == FOLD_ASSIGNMENT and "folder" in store.attrs["subject_rule"]


def test_subjects_are_the_patient_folders_with_slices_in_order(lgg):
    src, store, rows = lgg
    slices = _source_slices(src)
    subjects = store.subjects()
    assert len(subjects) == len([d for d in src.iterdir() if d.is_dir()]) and sorted(subjects) == sorted(slices)
    for patient, ids in subjects.items():
        # Numeric order (1, 2, ..., 10), not the lexicographic order of the ids (1, 10, 11, ...).
        assert ids == [f"{patient}_{i}" for i in sorted(slices[patient])]
        assert sorted(slices[patient]) == list(range(1, len(ids) + 1))
        for i, cid in enumerate(ids, start=1):
            info = store.case(cid)
            assert (info.subject, info.slice_index) == (patient, i)
            assert (rows[cid]["subject"], rows[cid]["slice_index"]) == (patient, i)
    first, first_ids = next(iter(subjects.items()))
    assert store.subjects(folds=[store.case(first_ids[0]).fold])[first] == first_ids  # filters as case_ids does
    assert first not in store.subjects(exclude_folds=[store.case(first_ids[0]).fold])


def test_folds_are_per_subject(lgg):
    _, store, rows = lgg
    subjects = store.subjects()
    per_case_folds_split_a_patient = False
    for patient, ids in subjects.items():
        folds = {store.case(cid).fold for cid in ids} | {rows[cid]["fold"] for cid in ids}
        assert folds == {fold_of(patient, FOLDS)}, patient
        per_case_folds_split_a_patient |= len({fold_of(cid, FOLDS) for cid in ids}) > 1
    assert per_case_folds_split_a_patient  # the old per-case rule would leak patients: this test would see it
    assert len({fold_of(p, FOLDS) for p in subjects}) > 1
    train = set(store.case_ids(exclude_folds=[0]))
    val = set(store.case_ids(folds=[0]))
    assert not {store.case(c).subject for c in train} & {store.case(c).subject for c in val}


def test_tiff_pixels_and_masks_are_stored_exactly(lgg):
    src, store, rows = lgg
    empty = 0
    for patient, by_index in _source_slices(src).items():
        for i, path in by_index.items():
            cid = f"{patient}_{i}"
            case = store.path / "cases" / cid
            expected = tifffile.imread(path)  # (256, 256, 3) uint8, deflate-compressed
            assert expected.shape == (256, 256, 3) and expected.dtype == np.uint8
            # Plain zarr, not the project's reader: the raw stored pixels are the TIFF's, channel-first.
            np.testing.assert_array_equal(zarr.open_array(str(case / "image"), mode="r")[:, 0],
                                          np.moveaxis(expected, 2, 0))
            mask = tifffile.imread(path.with_name(f"{cid}_mask.tif"))
            assert set(np.unique(mask).tolist()) <= {0, 255}
            np.testing.assert_array_equal(zarr.open_array(str(case / "label"), mode="r")[0], mask > 0)
            assert json.loads(rows[cid]["label_counts"])["1"] == int((mask > 0).sum())
            empty += not mask.any()
    # uint8 images are stored bit-shuffled (byte shuffle is a no-op on 1 byte): 1.14x the deflate TIFFs, not 1.40x.
    stored = sum(f.stat().st_size for f in store.path.glob("cases/*/image/c.*"))
    assert stored < 1.2 * sum(p.stat().st_size for v in _source_slices(src).values() for p in v.values())
    # Empty masks (most slices) stay empty labels; the tumour slices keep every pixel.
    assert 0 < empty < len(rows) and sum(json.loads(r["label_counts"])["1"] == 0 for r in rows.values()) == empty


def test_one_patient_stacks_back_into_its_volume(lgg):
    src, store, _ = lgg
    patient = "TCGA_HT_7694_19950404"
    by_index = _source_slices(src)[patient]
    # The subject's slices in slice order, read as evaluation stacks them (per-subject metrics).
    slices = store.subjects()[patient]
    assert [store.case(cid).slice_index for cid in slices] == sorted(by_index)
    image = np.concatenate([store.read_case(cid)[0] for cid in slices], axis=1)
    label = np.concatenate([store.read_case(cid)[1] for cid in slices], axis=0)
    n = len(by_index)
    assert image.shape == (3, n, 256, 256) and image.dtype == np.float32 and label.shape == (n, 256, 256)
    raw = np.stack([tifffile.imread(by_index[i]) for i in sorted(by_index)])  # (S, H, W, 3)
    masks = np.stack([tifffile.imread(by_index[i].with_name(f"{by_index[i].stem}_mask.tif")) for i in sorted(by_index)])
    np.testing.assert_array_equal(label, masks > 0)
    # Each slice is z-scored with its own per-channel stats, as training reads it.
    src_f = raw.astype(np.float64)
    mean = src_f.mean(axis=(1, 2), keepdims=True)
    std = src_f.std(axis=(1, 2), keepdims=True)
    expected = np.where(std > 0, (src_f - mean) / np.where(std > 0, std, 1), src_f - mean)
    np.testing.assert_allclose(image, np.moveaxis(expected, 3, 0), atol=1e-4)
    assert label.any()  # a patient with tumour: per-patient Dice is meaningful


@pytest.fixture
def patient_copy(shared_data: Path, tmp_path: Path) -> Path:
    """A writable copy of one LGG patient folder (21 slices) under tmp_path/src/."""
    src = _lgg(shared_data) / "TCGA_HT_7694_19950404"
    dst = tmp_path / "src" / src.name
    shutil.copytree(src, dst)
    return dst


def test_bad_slices_in_a_patient_folder_are_failed_rows(patient_copy, tmp_path, run_cli, manifest):
    p = patient_copy.name
    (patient_copy / f"{p}_3_mask.tif").unlink()
    truncated = patient_copy / f"{p}_10.tif"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    corrupt = patient_copy / f"{p}_11.tif"
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 300] = bytes(300)  # inside the deflate stream: fails its check
    corrupt.write_bytes(bytes(data))
    bad_mask = patient_copy / f"{p}_12_mask.tif"
    bad_mask.write_bytes(bad_mask.read_bytes()[:100])

    dst = tmp_path / "out"
    assert run_cli("images2d", "--src", str(patient_copy.parent), "--dst", str(dst), "--name", "bad") == 3
    rows = manifest(dst / "bad.manifest.parquet")
    assert len(rows) == 21
    failed = {cid: r for cid, r in rows.items() if r["status"] == "failed"}
    assert sorted(failed) == [f"{p}_10", f"{p}_11", f"{p}_12", f"{p}_3"]
    reasons = {cid: r["error"] for cid, r in failed.items()}
    assert f"{p}_3.tif" in reasons[f"{p}_3"] and f"expected {p}_3_mask.<ext>" in reasons[f"{p}_3"]
    assert str(truncated) in reasons[f"{p}_10"] and "truncated" in reasons[f"{p}_10"]
    assert str(corrupt) in reasons[f"{p}_11"] and "decompressing" in reasons[f"{p}_11"]
    assert str(bad_mask) in reasons[f"{p}_12"] and "expected a complete TIFF" in reasons[f"{p}_12"]
    for cid, r in failed.items():
        assert "\n" not in r["error"]
        assert (r["subject"], r["slice_index"]) == (p, int(cid.rsplit("_", 1)[1]))  # placed even when failed
    store = Store.open(dst / "bad.zarr")
    assert store.case_ids() == sorted(cid for cid, r in rows.items() if r["status"] == "ok")
    assert len(store.subjects()[p]) == 17  # the rest converted, still one subject in slice order
    assert [store.case(c).slice_index for c in store.subjects()[p]] == sorted(
        int(c.rsplit("_", 1)[1]) for c in store.case_ids()
    )


def test_subject_regex_overrides_and_reruns_update_in_place(shared_data, tmp_path, run_cli, manifest):
    src = tmp_path / "flat"
    src.mkdir()
    for patient in ("TCGA_CS_4941_19960909", "TCGA_HT_7694_19950404"):  # two patients' slices in one folder
        for p in sorted((_lgg(shared_data) / patient).glob(f"{patient}_[1-6]*.tif")):
            shutil.copy(p, src / p.name)
    dst = tmp_path / "out"
    args = ("images2d", "--src", str(src), "--dst", str(dst), "--name", "flat")
    assert run_cli(*args) == 0
    store = Store.open(dst / "flat.zarr")
    ids = store.case_ids()
    # At the --src root there is no patient folder: every slice is its own subject, folded by its case id.
    assert all(store.case(c).subject is None and store.case(c).fold == fold_of(c, FOLDS) for c in ids)
    assert sorted(store.subjects()) == ids

    regex = r"^(TCGA_[A-Z]+_[A-Z0-9]+)_"
    assert run_cli(*args, "--subject-regex", regex) == 0
    rows = manifest(dst / "flat.manifest.parquet")
    assert {r["status"] for r in rows.values()} == {"skipped"}  # unchanged pixels: only placement rewritten
    store = Store.open(dst / "flat.zarr")
    assert sorted(store.subjects()) == ["TCGA_CS_4941", "TCGA_HT_7694"]
    for subject, members in store.subjects().items():
        assert {store.case(c).fold for c in members} == {fold_of(subject, FOLDS)}
        assert {rows[c]["subject"] for c in members} == {subject}
    assert store.attrs["subject_rule"].endswith(f"{regex!r} searched in the case id")

    shutil.copy(src / "TCGA_CS_4941_19960909_1.tif", src / "other_1.tif")
    shutil.copy(src / "TCGA_CS_4941_19960909_1_mask.tif", src / "other_1_mask.tif")
    assert run_cli(*args, "--subject-regex", regex) == 3
    row = manifest(dst / "flat.manifest.parquet")["other_1"]
    assert row["status"] == "failed" and "does not match --subject-regex" in row["error"]
    assert run_cli(*args, "--subject-regex", "(a)(b)") == 2  # exactly one group


def test_channel_names(patient_copy, tmp_path, run_cli, caplog):
    src = patient_copy.parent
    assert run_cli("images2d", "--src", str(src), "--dst", str(tmp_path / "o"), "--name", "n",
                   "--channel-names", "pre,flair,post") == 0
    assert Store.open(tmp_path / "o" / "n.zarr").channels == ["pre", "flair", "post"]
    assert run_cli("images2d", "--src", str(src), "--dst", str(tmp_path / "o"), "--name", "m",
                   "--channel-names", "flair") == 2
    assert "1 names but the images are converted with 3 channel(s)" in caplog.text
    # Renaming the channels of an existing store is refused with a one-line reason, not a traceback.
    assert run_cli("images2d", "--src", str(src), "--dst", str(tmp_path / "o"), "--name", "n") == 2
    assert "existing store has channels ['pre', 'flair', 'post']" in caplog.text


def test_discovery_subject_and_slice_index_rules(tmp_path):
    for rel in ("P1/P1_7.png", "P1/P1_7_mask.png", "P2/images/s_2.png", "P2/masks/s_2.png", "root.png",
                "root_mask.png", "site/P3/x_1.png", "site/P3/x_1_mask.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    cases = {c.case_id: c for c in discover_images2d(tmp_path)}
    assert {cid: (c.subject, c.slice_index) for cid, c in cases.items()} == {
        "P1_7": ("P1", 7), "s_2": ("P2", 2), "root": (None, None), "x_1": ("P3", 1),
    }
    assert slice_index_of("case_0012") == 12 and slice_index_of("3000") is None and slice_index_of("a_b") is None
