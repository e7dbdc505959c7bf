"""BraTS naming discovery across releases, and the synthetic generator (determinism, contrasts)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from preprocess.discover import discover_brats, parse_brats_name
from preprocess.synth import synth_brats_case, write_synth
from tests.conftest import readme_label_counts


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Brats18_2013_3_1_t1ce.nii.gz", ("Brats18_2013_3_1", "t1ce", "brats2018")),
        ("Brats18_CBICA_ABM_1_seg.nii", ("Brats18_CBICA_ABM_1", "seg", "brats2018")),
        ("BraTS20_Training_001_flair.nii", ("BraTS20_Training_001", "flair", "brats2018")),
        ("BraTS2021_00000_t1.nii.gz", ("BraTS2021_00000", "t1", "brats2018")),
        ("BraTS-GLI-00001-000-t1c.nii.gz", ("BraTS-GLI-00001-000", "t1ce", "brats2023")),
        ("BraTS-GLI-00001-000-t2f.nii.gz", ("BraTS-GLI-00001-000", "flair", "brats2023")),
        ("BraTS-MEN-00004-000-t1n.nii", ("BraTS-MEN-00004-000", "t1", "brats2023")),
        ("BraTS-MET-00002-000-seg.nii.gz", ("BraTS-MET-00002-000", "seg", "brats2023")),
        ("BraTS-PED-00003-000-t2w.nii.gz", ("BraTS-PED-00003-000", "t2", "brats2023")),
        ("BraTS-SSA-00010-000-t2f.nii.gz", ("BraTS-SSA-00010-000", "flair", "brats2023")),
        ("notes.txt", None),
        ("random_volume.nii.gz", None),
    ],
)
def test_parse_brats_names(name, expected):
    assert parse_brats_name(name) == expected


def test_discover_groups_real_cases(shared_data):
    cases = {c.case_id: c for c in discover_brats(shared_data)}
    brats18 = sorted(p.name for p in (shared_data / "brats2018").iterdir() if p.name.startswith("Brats18_"))
    assert len(brats18) == len([c for c in readme_label_counts(shared_data) if c.startswith("Brats18_")]) > 0
    assert sorted(cases) == sorted(["BraTS-GLI-00001-000", "BraTS2021_00006", *brats18])
    assert set(cases["Brats18_2013_3_1"].files) == {"t1", "t1ce", "t2", "flair", "seg"}
    assert set(cases["BraTS2021_00006"].files) == {"t1", "t1ce", "t2", "flair", "seg"}
    assert set(cases["BraTS-GLI-00001-000"].files) == {"t1", "t1ce", "t2", "flair"}
    assert all(not c.problems for c in cases.values())
    # Subjects: a 2023 id without its timepoint; a 2018-2021 id is its own subject. No slice index for volumes.
    assert cases["BraTS-GLI-00001-000"].subject == "BraTS-GLI-00001"
    assert all(c.subject == cid for cid, c in cases.items() if c.naming == "brats2018")
    assert all(c.slice_index is None for c in cases.values())


def _digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*.nii.gz")):
        h.update(p.name.encode())
        h.update(np.asanyarray(nib.load(p).dataobj).tobytes())
    return h.hexdigest()


def test_synth_is_deterministic_by_seed(tmp_path):
    write_synth("brats", 2, tmp_path / "a", seed=5, shape=(24, 24, 16))
    write_synth("brats", 2, tmp_path / "b", seed=5, shape=(24, 24, 16))
    write_synth("brats", 2, tmp_path / "c", seed=6, shape=(24, 24, 16))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_synth_brats_layout_and_contrasts():
    images, seg = synth_brats_case(np.random.default_rng([0, 0]), (64, 64, 40))
    assert images.dtype == np.int16 and images.shape == (4, 64, 64, 40)
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}
    t1, t1ce, t2, flair = (images[i].astype(np.float64) for i in range(4))
    brain = images[0] != 0
    healthy = brain & (seg == 0)

    def mean(v, m):
        return v[m].mean()

    # Enhancing rim: bright in t1ce only.
    rim = seg == 4
    assert mean(t1ce, rim) > 1.5 * mean(t1ce, healthy)
    assert mean(t1, rim) < 1.2 * mean(t1, healthy)
    # Oedema: bright in t2 and flair.
    oed = seg == 2
    assert mean(t2, oed) > 1.5 * mean(t2, healthy) and mean(flair, oed) > 1.5 * mean(flair, healthy)
    # Necrosis: bright t2 but dark flair (separates it from oedema), dark t1ce (separates it from the rim).
    nec = seg == 1
    assert mean(t2, nec) > 1.5 * mean(t2, healthy) and mean(flair, nec) < 0.5 * mean(flair, oed)
    assert mean(t1ce, nec) < 0.5 * mean(t1ce, rim)
    assert not images[:, ~brain].any()  # background exactly 0 in every contrast


def test_synth_2d_writes_images_and_masks(tmp_path):
    from PIL import Image

    write_synth("images2d", 2, tmp_path, seed=0, shape=(32, 40))
    img = np.asarray(Image.open(tmp_path / "images" / "case_0000.png"))
    mask = np.asarray(Image.open(tmp_path / "masks" / "case_0000.png"))
    assert img.shape == mask.shape == (32, 40)
    assert set(np.unique(mask).tolist()) == {0, 255}
    assert img[mask > 0].mean() > img[(mask == 0) & (img > 0)].mean()  # tumour is visible
