"""Conversion correctness on the real BraTS sample cases (../shared/data): labels, intensities, undo info."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

from distseg.data.geometry import restore_to_source_geometry
from distseg.data.store import Store
from preprocess.brats import convert_brats_case
from preprocess.discover import discover_brats
from preprocess.writer import Layout, init_store
from tests.conftest import SHARED_DATA, readme_label_counts

# From ../shared/data/README.md (source convention: 4 = enhancing, stored as 3): every labelled case it lists.
README_COUNTS = {case: {str(k): v for k, v in c.items()} for case, c in readme_label_counts(SHARED_DATA).items()} \
    if SHARED_DATA.is_dir() else {}


@pytest.fixture(scope="module")
def real_store(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    """All real BraTS sample cases converted once (serial, no Ray)."""
    from preprocess.brats import brats_root_attrs

    store_path = tmp_path_factory.mktemp("real") / "real.zarr"
    init_store(store_path, brats_root_attrs())
    cases = [c for d in ("brats2018", "brats2021", "brats2023-naming") for c in discover_brats(shared_data / d)]
    rows = {c.case_id: convert_brats_case(c, store_path, 0, Layout()) for c in cases}
    return store_path, rows


def test_all_real_cases_convert(real_store, shared_data):
    _, rows = real_store
    listed = {p.name for d in ("brats2018", "brats2021") for p in (shared_data / d).iterdir() if p.is_dir()}
    assert sorted(README_COUNTS) == sorted(listed)  # the README lists every labelled case on disk
    assert sorted(rows) == ["BraTS-GLI-00001-000", *sorted(README_COUNTS)]
    assert {r["status"] for r in rows.values()} == {"ok"}, {k: r["error"] for k, r in rows.items()}


@pytest.mark.parametrize("case_id", sorted(README_COUNTS))
def test_label_counts_survive_conversion(real_store, case_id):
    store_path, rows = real_store
    assert json.loads(rows[case_id]["label_counts_source"]) == README_COUNTS[case_id]
    src = README_COUNTS[case_id]
    expected_stored = {"0": src["0"], "1": src["1"], "2": src["2"], "3": src["4"]}
    assert json.loads(rows[case_id]["label_counts"]) == expected_stored
    # Count again from what a reader actually gets back.
    store = Store.open(store_path)
    _, label = store.read_case(case_id)
    counts = np.bincount(label.ravel(), minlength=4)
    assert counts[1:].tolist() == [src["1"], src["2"], src["4"]]
    assert set(np.unique(label).tolist()) <= {0, 1, 2, 3}


@pytest.mark.parametrize("case_id", sorted(README_COUNTS))
def test_undo_reconstructs_original_label_exactly(real_store, shared_data, case_id):
    store_path, _ = real_store
    store = Store.open(store_path)
    info = store.case(case_id)
    _, label = store.read_case(case_id)
    restored = restore_to_source_geometry(label, info.attrs)
    release = "brats2021" if case_id.startswith("BraTS2021") else "brats2018"
    seg = nib.load(shared_data / release / case_id / f"{case_id}_seg.nii.gz")
    original = np.asanyarray(seg.dataobj)
    assert restored.shape == original.shape
    np.testing.assert_array_equal(restored, original)
    np.testing.assert_allclose(np.asarray(info.attrs["affine"]), seg.affine)


def test_stored_intensities_are_the_cropped_originals(real_store, shared_data):
    store_path, _ = real_store
    store = Store.open(store_path)
    case_id = "Brats18_CBICA_ABM_1"
    info = store.case(case_id)
    # Plain zarr decodes the chunk files our writer encoded directly.
    raw = zarr.open_array(str(store_path / "cases" / case_id / "image"), mode="r")[...]
    np.testing.assert_array_equal(raw, store._array(case_id, "image")[...])
    label = zarr.open_array(str(store_path / "cases" / case_id / "label"), mode="r")[...]
    np.testing.assert_array_equal(label, store.read_case(case_id)[1])
    t1ce = np.asanyarray(nib.load(shared_data / "brats2018" / case_id / f"{case_id}_t1ce.nii.gz").dataobj)
    box = tuple(slice(lo, hi) for lo, hi in info.attrs["crop_box_zyx"])
    np.testing.assert_array_equal(raw[1], t1ce.transpose(2, 1, 0)[box])
    # Nothing nonzero was cropped away.
    full = np.zeros(info.attrs["original_shape_zyx"], dtype=bool)
    full[box] = True
    assert not np.any((t1ce.transpose(2, 1, 0) != 0) & ~full)


def test_2023_named_case_converts_unlabelled(real_store):
    store_path, rows = real_store
    row = rows["BraTS-GLI-00001-000"]
    assert row["naming"] == "brats2023" and row["has_label"] is False and row["label_counts"] is None
    store = Store.open(store_path)
    assert "BraTS-GLI-00001-000" not in store.case_ids(labelled_only=True)
    image, label = store.read_case("BraTS-GLI-00001-000")
    assert label is None and image.shape[0] == 4 and image.dtype == np.float32
    assert store.case("BraTS-GLI-00001-000").attrs["source_modalities"]["t1ce"].endswith("-t1c.nii.gz")
