"""The test split set aside at preprocessing (`--test-subjects`, `--test-fraction`) and fold balancing: recorded
in the manifest and the store, and invisible to every reader that trains, validates or chooses."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distseg.data.store import Store
from preprocess.__main__ import main
from preprocess.common import assign_folds, in_test_fraction
from preprocess.discover import SourceCase
from preprocess.synth import write_synth


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("split") / "raw"
    write_synth("brats", 7, src, seed=3, shape=(24, 24, 16))
    return src


def _convert(raw: Path, dst: Path, *extra: str) -> int:
    return main(["brats", "--src", str(raw), "--dst", str(dst), "--name", "s", "--serial", "--folds", "3", *extra])


def test_test_subjects_are_recorded_and_never_listed_for_training(raw: Path, tmp_path: Path) -> None:
    test = ["BraTS2021_00001", "BraTS2021_00004"]
    assert _convert(raw, tmp_path, "--test-subjects", ",".join(test)) == 0
    rows = {r["case_id"]: r for r in pq.read_table(tmp_path / "s.manifest.parquet").to_pylist()}
    assert {c for c, r in rows.items() if r["split"] == "test"} == set(test)
    assert all(rows[c]["fold"] == -1 for c in test)
    assert all(r["split"] == "train" and 0 <= r["fold"] < 3 for c, r in rows.items() if c not in test)
    store = Store.open(tmp_path / "s.zarr")
    assert store.attrs["test_split"]["subjects"] == test
    # Every default listing (what training, validation and choices use) leaves the test split out ...
    pool = store.case_ids()
    assert set(pool) == set(rows) - set(test)
    assert set(store.case_ids(folds=[0, 1, 2], labelled_only=True)) == set(pool)
    assert set(store.case_ids(exclude_folds=[0])) <= set(pool)
    assert not set(store.subjects()) & set(test)
    # ... and only asking for it by name returns it.
    assert store.case_ids(split="test") == test and store.case(test[0]).split == "test"
    assert set(store.case_ids(split=None)) == set(rows)
    # A rerun that moves a subject into the test split rewrites its placement in place (no reconversion).
    assert _convert(raw, tmp_path, "--test-subjects", "BraTS2021_00002") == 0
    store = Store.open(tmp_path / "s.zarr")
    assert store.case_ids(split="test") == ["BraTS2021_00002"]
    assert "BraTS2021_00001" in store.case_ids()
    statuses = {r["status"] for r in pq.read_table(tmp_path / "s.manifest.parquet").to_pylist()}
    assert statuses == {"skipped"}


def test_unknown_test_subject_is_a_usage_error_and_writes_nothing(raw: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    assert _convert(raw, tmp_path, "--test-subjects", "BraTS2021_00001,nobody") == 2
    assert "nobody" in caplog.text and "match no discovered case" in caplog.text
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "s.manifest.parquet").exists()


def test_test_fraction_is_per_subject_and_stable() -> None:
    subjects = [f"P{i:03d}" for i in range(2000)]
    drawn = [s for s in subjects if in_test_fraction(s, 0.2)]
    assert 0.17 < len(drawn) / len(subjects) < 0.23
    # Independent of the other subjects: a subject's draw never changes as the dataset grows.
    assert [s for s in subjects[:100] if in_test_fraction(s, 0.2)] == [s for s in drawn if s < "P100"]
    cases = [SourceCase(f"{s}_slice{j}", "images2d", subject=s) for s in subjects[:50] for j in range(3)]
    folds = assign_folds(cases, 5, test_fraction=0.2)
    by_subject: dict[str, set[int]] = {}
    for c in cases:
        by_subject.setdefault(c.subject, set()).add(folds[c.case_id])
    assert all(len(f) == 1 for f in by_subject.values())  # every slice of a patient lands together
    assert {s for s, f in by_subject.items() if f == {-1}} == {s for s in subjects[:50] if in_test_fraction(s, 0.2)}


def test_balanced_folds_differ_by_at_most_one_subject() -> None:
    cases = [SourceCase(f"S{i}", "brats2018", subject=f"S{i}") for i in range(17)]
    hashed = Counter(assign_folds(cases, 5).values())
    balanced = Counter(assign_folds(cases, 5, test_subjects={"S0", "S1"}, balanced=True).values())
    assert balanced.pop(-1) == 2
    assert max(balanced.values()) - min(balanced.values()) <= 1 and sum(balanced.values()) == 15
    assert sum(hashed.values()) == 17 and -1 not in hashed


def test_store_without_split_attrs_reads_as_train(raw: Path, tmp_path: Path) -> None:
    """Stores written before test splits have no `split` attr: every case is in the pool."""
    assert _convert(raw, tmp_path) == 0
    case_meta = tmp_path / "s.zarr" / "cases" / "BraTS2021_00000" / "zarr.json"
    doc = json.loads(case_meta.read_text())
    doc["attributes"].pop("split")
    case_meta.write_text(json.dumps(doc))
    (tmp_path / "s.zarr" / "index.json").unlink()
    store = Store.open(tmp_path / "s.zarr")
    assert "BraTS2021_00000" in store.case_ids() and store.case("BraTS2021_00000").split == "train"
