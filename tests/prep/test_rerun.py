"""Rerun semantics on shared storage: skip unchanged, redo changed/incomplete, clean leftovers, refold."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from distseg.data.layout import PREVIOUS_INDEX
from distseg.data.store import Store
from preprocess.common import fold_of


def _mtimes(case_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(case_dir)): p.stat().st_mtime_ns for p in case_dir.rglob("*") if p.is_file()}


def test_rerun_skips_unchanged_and_redoes_changed(brats_src, tmp_path, run_cli, manifest):
    dst = tmp_path / "out"
    args = ("brats", "--src", str(brats_src), "--dst", str(dst), "--name", "r")
    assert run_cli(*args) == 0
    store_path = dst / "r.zarr"
    ids = Store.open(store_path).case_ids()
    before = {cid: _mtimes(store_path / "cases" / cid) for cid in ids}

    # Change one case's source content (same size is not guaranteed; content certainly differs).
    changed = ids[1]
    seg_path = brats_src / changed / f"{changed}_seg.nii.gz"
    seg = np.asanyarray(nib.load(seg_path).dataobj).copy()
    seg[seg == 2] = 0
    nib.Nifti1Image(seg, nib.load(seg_path).affine).to_filename(seg_path)
    # Touch another case without changing its bytes: size matches, mtime differs -> checksum decides "unchanged".
    touched = ids[2]
    t1 = brats_src / touched / f"{touched}_t1.nii.gz"
    os.utime(t1, ns=(t1.stat().st_atime_ns, t1.stat().st_mtime_ns + 10**9))

    assert run_cli(*args) == 0
    rows = manifest(dst / "r.manifest.parquet")
    assert rows[changed]["status"] == "ok"
    assert {rows[c]["status"] for c in ids if c != changed} == {"skipped"}
    for cid in ids:
        if cid not in (changed, touched):
            assert _mtimes(store_path / "cases" / cid) == before[cid]  # data untouched
    _, label = Store.open(store_path).read_case(changed)
    assert not (label == 2).any()  # the new content is what readers see
    # the touched case's attrs were rewritten in place (new mtime): its arrays' consolidated metadata stays
    doc = json.loads((store_path / "cases" / touched / "zarr.json").read_text())
    assert set(doc["consolidated_metadata"]["metadata"]) == {"image", "label", "foreground"}
    index = store_path / "index.json"
    index_before = (index.read_bytes(), index.stat().st_mtime_ns)
    # The third run does not even re-hash the touched case: its new mtime was recorded.
    assert run_cli(*args) == 0
    assert {r["status"] for r in manifest(dst / "r.manifest.parquet").values()} == {"skipped"}
    # Nothing changed, so the case index is the same file, untouched (a rerun redoes nothing), and nothing is left
    # parked beside it.
    assert (index.read_bytes(), index.stat().st_mtime_ns) == index_before
    assert not (store_path / PREVIOUS_INDEX).exists()


def test_a_case_gone_from_the_source_leaves_the_store_but_is_kept_aside(brats_src, tmp_path, run_cli, caplog):
    """A patient removed from --src (e.g. to hold it out) must not stay in training with its old fold: the rerun
    moves it, whole, beside the store and names it; the index and every reader no longer list it."""
    import shutil

    dst = tmp_path / "out"
    args = ("brats", "--src", str(brats_src), "--dst", str(dst), "--name", "r")
    assert run_cli(*args) == 0
    ids = Store.open(dst / "r.zarr").case_ids()
    gone = ids[0]
    shutil.move(brats_src / gone, tmp_path / gone)
    assert run_cli(*args) == 0
    assert Store.open(dst / "r.zarr").case_ids() == ids[1:]
    assert "moved out of the store" in caplog.text and gone in caplog.text
    kept = list((dst / "r.retired").glob(f"*/{gone}/zarr.json"))
    assert len(kept) == 1


def test_leftovers_of_a_killed_run_are_cleaned_and_redone(brats_src, tmp_path, run_cli, manifest):
    dst = tmp_path / "out"
    args = ("brats", "--src", str(brats_src), "--dst", str(dst), "--name", "k")
    assert run_cli(*args) == 0
    store_path = dst / "k.zarr"
    victim = Store.open(store_path).case_ids()[0]
    # Simulate a run killed mid-write: it removed the case index when it started (store.remove_index), then left
    # debris in .tmp/ and an incomplete case dir (no group metadata).
    (store_path / "index.json").unlink()
    (store_path / ".tmp" / f"{victim}.deadbeef" / "image").mkdir(parents=True)
    (store_path / ".tmp" / f"{victim}.deadbeef" / "image" / "c").write_bytes(b"partial")
    (store_path / "cases" / victim / "zarr.json").unlink()
    assert victim not in Store.open(store_path).case_ids()  # incomplete case is invisible to readers

    assert run_cli(*args) == 0
    rows = manifest(dst / "k.manifest.parquet")
    assert rows[victim]["status"] == "ok"
    assert os.listdir(store_path / ".tmp") == []
    assert (store_path / "index.json").is_file()  # the finished rerun indexed the store again
    s = Store.open(store_path)
    assert victim in s.case_ids()
    image, label = s.read_case(victim)
    assert image.shape[1:] == label.shape


def test_changing_folds_updates_fold_without_reconverting(brats_src, tmp_path, run_cli, manifest):
    dst = tmp_path / "out"
    base = ("brats", "--src", str(brats_src), "--dst", str(dst), "--name", "f")
    assert run_cli(*base, "--folds", "2") == 0
    assert run_cli(*base, "--folds", "7") == 0
    rows = manifest(dst / "f.manifest.parquet")
    s = Store.open(dst / "f.zarr")
    for cid in s.case_ids():
        assert rows[cid]["status"] == "skipped"
        assert rows[cid]["fold"] == s.case(cid).fold == fold_of(cid, 7)


def test_folds_are_stable_when_cases_are_added():
    ids = [f"BraTS2021_{i:05d}" for i in range(50)]
    before = {c: fold_of(c, 5) for c in ids}
    more = ids + [f"BraTS-GLI-{i:05d}-000" for i in range(20)]
    assert all(fold_of(c, 5) == before[c] for c in more if c in before)
    assert len(set(before.values())) == 5  # every fold used
