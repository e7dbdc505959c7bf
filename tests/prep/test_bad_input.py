"""Bad input: each bad case fails with a one-line reason naming the file, the good cases are still written."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from distseg.data.store import Store
from preprocess.brats import brats_root_attrs, convert_brats_case
from preprocess.discover import SourceCase, discover_brats
from preprocess.synth import write_synth
from preprocess.writer import Layout, init_store

SHAPE = (32, 36, 24)


def _cid(i: int) -> str:
    return f"BraTS2021_{i:05d}"


def _path(src: Path, i: int, mod: str) -> Path:
    return src / _cid(i) / f"{_cid(i)}_{mod}.nii.gz"


def _rewrite(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    old = nib.load(path)
    nib.Nifti1Image(data, old.affine if affine is None else affine).to_filename(path)


@pytest.fixture(scope="module")
def bad_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("bad") / "src"
    write_synth("brats", 10, src, seed=3, shape=SHAPE)
    # 1: truncated gzip
    p = _path(src, 1, "t1")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    # 2: missing modality
    _path(src, 2, "t1ce").unlink()
    # 3: shape mismatch
    _rewrite(_path(src, 3, "t2"), np.ones((SHAPE[0], SHAPE[1], SHAPE[2] - 2), dtype=np.int16))
    # 4: affine mismatch (shifted 5 mm)
    aff = nib.load(_path(src, 4, "flair")).affine.copy()
    aff[0, 3] += 5.0
    _rewrite(_path(src, 4, "flair"), np.asanyarray(nib.load(_path(src, 4, "flair")).dataobj), aff)
    # 5: NaN intensities (float image)
    t1 = np.asanyarray(nib.load(_path(src, 5, "t1")).dataobj).astype(np.float32)
    t1[5, 5, 5] = np.nan
    _rewrite(_path(src, 5, "t1"), t1)
    # 6: label value 3 in a 2018-2021 release (expects {0,1,2,4})
    seg = np.asanyarray(nib.load(_path(src, 6, "seg")).dataobj).copy()
    seg[seg == 4] = 3
    _rewrite(_path(src, 6, "seg"), seg)
    # 7: not a NIfTI although named like one (gzipped text)
    _path(src, 7, "t2").write_bytes(gzip.compress(b"this is a radiology report, not an image\n" * 50))
    # 8: duplicate case id: the same case again in another folder
    shutil.copytree(src / _cid(8), src / "again" / _cid(8))
    return src


EXPECTED = {  # case -> (file named in the error, words the reason must contain)
    1: ("_t1.nii.gz", "truncated or corrupt gzip"),
    2: ("_t1ce.nii.gz", "missing modality t1ce"),
    3: ("_t2.nii.gz", "shape"),
    4: ("_flair.nii.gz", "affine differs"),
    5: ("_t1.nii.gz", "non-finite"),
    6: ("_seg.nii.gz", "unexpected label values [3]"),
    7: ("_t2.nii.gz", "not a NIfTI"),
    8: (_cid(8), "duplicate case id"),
}


@pytest.fixture(scope="module")
def result(bad_src: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, dict], Path]:
    import pyarrow.parquet as pq

    from preprocess.__main__ import main

    dst = tmp_path_factory.mktemp("bad_out")
    code = main(["brats", "--src", str(bad_src), "--dst", str(dst), "--name", "bad", "--serial"])
    rows = {r["case_id"]: r for r in pq.read_table(dst / "bad.manifest.parquet").to_pylist()}
    return code, rows, dst / "bad.zarr"


def test_exit_status_3_when_some_cases_fail(result):
    assert result[0] == 3


def test_good_cases_written_and_only_them(result):
    _, rows, store_path = result
    assert rows[_cid(0)]["status"] == "ok" and rows[_cid(9)]["status"] == "ok"
    assert Store.open(store_path).case_ids() == [_cid(0), _cid(9)]
    assert os.listdir(store_path / ".tmp") == []


@pytest.mark.parametrize("i", sorted(EXPECTED))
def test_each_bad_case_has_a_clear_one_line_reason(result, i):
    _, rows, _ = result
    row = rows[_cid(i)]
    fname, words = EXPECTED[i]
    assert row["status"] == "failed"
    assert "\n" not in row["error"]
    assert fname in row["error"], row["error"]
    assert words in row["error"], row["error"]
    assert "expected" in row["error"], row["error"]


def test_case_id_escaping_the_output_folder_is_refused(tmp_path, synth_brats_src):
    store_path = tmp_path / "out" / "x.zarr"
    init_store(store_path, brats_root_attrs())
    files = {m: p for m, p in discover_brats(synth_brats_src)[0].files.items()}
    for evil in ("..", "../escape", "a/b", ".hidden", "ok\n"):
        row = convert_brats_case(SourceCase(evil, "brats2018", files), store_path, 0, Layout())
        assert row["status"] == "failed" and "not a safe folder name" in row["error"], row
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(tmp_path / "out")) == ["x.zarr"]
    assert os.listdir(store_path / "cases") == ["zarr.json"]  # the group's own metadata, no case


def test_empty_source_folder_is_a_usage_error(tmp_path, run_cli, caplog):
    (tmp_path / "empty").mkdir()
    assert run_cli("brats", "--src", str(tmp_path / "empty"), "--dst", str(tmp_path / "o")) == 2
    assert "no BraTS cases found" in caplog.text
    assert run_cli("images2d", "--src", str(tmp_path / "empty"), "--dst", str(tmp_path / "o")) == 2


def test_missing_src_and_bad_args_exit_2(tmp_path, run_cli):
    assert run_cli("brats", "--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "o")) == 2
    assert run_cli("brats", "--dst", str(tmp_path / "o")) == 2
    assert run_cli("brats", "--src", str(tmp_path), "--dst", str(tmp_path / "o"), "--folds", "0") == 2
