"""Files opened per patch (issue 14: <= 4): the case's zarr.json carries its arrays' metadata (consolidated), and
a sharded array keeps its one shard file open; stores written before read as before and a rerun upgrades them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from distseg.data.layout import StoreError
from distseg.data.store import Store


def _store_opens(store_path: Path, fn) -> list[str]:
    """The files under `store_path` that `fn()` opens (Python's audit hook on `open`: `open()` and `os.open`)."""
    opened: list[str] = []
    active = [True]

    def hook(event: str, args: tuple) -> None:
        if active[0] and event == "open" and str(args[0]).startswith(str(store_path)):
            opened.append(str(Path(args[0]).relative_to(store_path)))

    sys.addaudithook(hook)  # hooks cannot be removed: switched off below
    try:
        fn()
    finally:
        active[0] = False
    return opened


def test_a_patch_opens_three_files_on_first_touch_of_a_case_and_none_after(store_path):
    """Issue 14: at most 4 files per patch. The case's zarr.json carries its arrays' metadata (consolidated), and a
    shard's index and data are read through one open that stays open: 3 opens for a case's first patch, 0 after."""
    s = Store.open(store_path)
    cid = s.case_ids()[0]
    s.case(cid)
    first = _store_opens(store_path, lambda: s.read_patch(cid, (1, 2, 3), (8, 8, 8)))
    assert sorted(first) == sorted([f"cases/{cid}/zarr.json", f"cases/{cid}/image/c.0.0.0.0",
                                    f"cases/{cid}/label/c.0.0.0"])
    assert _store_opens(store_path, lambda: [s.read_patch(cid, (z, 0, 0), (8, 8, 8)) for z in range(0, 16, 4)]) == []
    # the arrays' own zarr.json stay for zarr and older readers and say the same
    doc = json.loads((store_path / "cases" / cid / "zarr.json").read_text())
    assert doc["consolidated_metadata"]["kind"] == "inline"
    for name, meta in doc["consolidated_metadata"]["metadata"].items():
        assert meta == json.loads((store_path / "cases" / cid / name / "zarr.json").read_text())
    group = zarr.open_group(str(store_path / "cases" / cid), mode="r")
    np.testing.assert_array_equal(group["label"][...], s.read_label(cid))
    # evicted handles close their files; the next read reopens
    s.MAX_OPEN_ARRAYS = 2
    evicted = [s._arrays[(cid, "image")], s._arrays[(cid, "label")]]
    closers = [a.source._closer for a in evicted]
    assert all(a.source._fd is not None for a in evicted) and all(c.alive for c in closers)
    other = s.case_ids()[1]
    assert sorted(_store_opens(store_path, lambda: s.read_patch(other, (0, 0, 0), (4, 4, 4)))) == sorted(
        [f"cases/{other}/zarr.json", f"cases/{other}/image/c.0.0.0.0", f"cases/{other}/label/c.0.0.0"])
    assert list(s._arrays) == [(other, "image"), (other, "label")]
    assert all(a.source._fd is None for a in evicted) and not any(c.alive for c in closers)  # os.close ran
    assert cid not in s._case_arrays  # its metadata left with its last handle
    assert sorted(_store_opens(store_path, lambda: s.read_patch(cid, (0, 0, 0), (4, 4, 4)))) == sorted(
        [f"cases/{cid}/zarr.json", f"cases/{cid}/image/c.0.0.0.0", f"cases/{cid}/label/c.0.0.0"])


def test_a_store_without_consolidated_metadata_reads_each_array_s_own(store_path, brats_src, run_cli):
    """Stores written before the case's zarr.json carried its arrays' metadata read as before (one more open per
    array on a case's first patch); a rerun of the converter upgrades them in place without rewriting any data."""
    reference = Store.open(store_path)
    cids = reference.case_ids()
    expected = {c: reference.read_case(c) for c in cids}
    for cid in cids:
        meta = store_path / "cases" / cid / "zarr.json"
        doc = json.loads(meta.read_text())
        del doc["consolidated_metadata"]
        meta.write_text(json.dumps(doc))
    s = Store.open(store_path)
    first = _store_opens(store_path, lambda: s.read_patch(cids[0], (0, 0, 0), (8, 8, 8)))
    assert f"cases/{cids[0]}/image/zarr.json" in first and f"cases/{cids[0]}/label/zarr.json" in first
    # consolidated metadata that does not list an array: that array's own zarr.json is read
    partial = cids[1]
    meta = store_path / "cases" / partial / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": {}}
    meta.write_text(json.dumps(doc))
    damaged = cids[2]
    (store_path / "cases" / damaged / "label" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match=rf"cases/{damaged}/label/zarr.json: unreadable metadata"):
        Store.open(store_path).read_label(damaged)
    cids = cids[:2]
    for cid in cids:
        image, label = s.read_case(cid)
        np.testing.assert_array_equal(image, expected[cid][0])
        np.testing.assert_array_equal(label, expected[cid][1])

    def shards() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in (store_path / "cases").rglob("c.*") if damaged not in str(p)}

    before = shards()
    assert run_cli("brats", "--src", str(brats_src), "--dst", str(store_path.parent), "--name", "s",
                   "--folds", "3") == 0
    assert shards() == before  # the data of the intact cases untouched; the damaged case was converted again
    s = Store.open(store_path)
    assert damaged in s.case_ids()
    for cid in [c for c in s.case_ids() if c != partial]:  # (a consolidated map is left as it is)
        assert sorted(_store_opens(store_path, lambda cid=cid: s.read_patch(cid, (0, 0, 0), (4, 4, 4)))) == sorted(
            [f"cases/{cid}/zarr.json", f"cases/{cid}/image/c.0.0.0.0", f"cases/{cid}/label/c.0.0.0"])
        np.testing.assert_array_equal(s.read_case(cid)[0], reference.read_case(cid)[0])
