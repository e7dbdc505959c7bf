"""BraTS subjects: 2023+ timepoints (`-000`, `-001`) of one patient share a fold; older ids are their own subject."""

from __future__ import annotations

from distseg.data.store import Store
from preprocess.common import FOLD_ASSIGNMENT, fold_of
from preprocess.discover import brats_subject
from tests.conftest import require_shared_data


def test_brats_subject_rule():
    assert brats_subject("BraTS-GLI-00001-001", "brats2023") == "BraTS-GLI-00001"
    assert brats_subject("BraTS-MEN-RT-00004-000", "brats2023") == "BraTS-MEN-RT-00004"
    assert brats_subject("BraTS2021_00006", "brats2018") == "BraTS2021_00006"
    assert brats_subject("Brats18_CBICA_ABM_1", "brats2018") == "Brats18_CBICA_ABM_1"  # trailing _1 is no timepoint


def test_2023_timepoints_share_a_fold(shared_data, tmp_path, run_cli, manifest):
    real = require_shared_data("brats2023-naming/BraTS-GLI-00001-000")
    src = tmp_path / "src"
    # Two timepoints of subject 00001 and one of subject 00002: links to the one real 2023-named case.
    for case in ("BraTS-GLI-00001-000", "BraTS-GLI-00001-001", "BraTS-GLI-00002-000"):
        (src / case).mkdir(parents=True)
        for f in real.glob("*.nii.gz"):
            (src / case / f.name.replace("BraTS-GLI-00001-000", case)).symlink_to(f)
    # A K under which the old per-case rule splits the two timepoints, so the test sees a regression.
    folds = next(k for k in range(2, 50) if fold_of("BraTS-GLI-00001-000", k) != fold_of("BraTS-GLI-00001-001", k))
    dst = tmp_path / "out"
    assert run_cli("brats", "--src", str(src), "--dst", str(dst), "--name", "t", "--folds", str(folds)) == 0
    rows = manifest(dst / "t.manifest.parquet")
    store = Store.open(dst / "t.zarr")
    assert store.attrs["fold_assignment"] == FOLD_ASSIGNMENT
    for cid, subject in (("BraTS-GLI-00001-000", "BraTS-GLI-00001"), ("BraTS-GLI-00001-001", "BraTS-GLI-00001"),
                         ("BraTS-GLI-00002-000", "BraTS-GLI-00002")):
        assert rows[cid]["subject"] == store.case(cid).subject == subject
        assert rows[cid]["fold"] == store.case(cid).fold == fold_of(subject, folds)
        assert rows[cid]["slice_index"] is None
    assert store.subjects() == {"BraTS-GLI-00001": ["BraTS-GLI-00001-000", "BraTS-GLI-00001-001"],
                                "BraTS-GLI-00002": ["BraTS-GLI-00002-000"]}
