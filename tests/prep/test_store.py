"""The reader contract (`distseg.data.store`) on stores written by the real converter."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

from distseg.data.geometry import restore_to_source_geometry
from distseg.data.layout import FORMAT_VERSION, StoreError
from distseg.data.store import Store
from preprocess.common import fold_of


def _set_root_attr(store_path: Path, key: str, value) -> None:
    meta = store_path / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"][key] = value
    meta.write_text(json.dumps(doc))


def test_root_attrs_follow_contract(store_path):
    s = Store.open(store_path)
    assert s.attrs["format_version"] == FORMAT_VERSION
    assert s.kind == "brats3d" and s.channels == ["t1", "t1ce", "t2", "flair"]
    assert s.regions == {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
    assert s.attrs["label_values"]["3"] == "enhancing"
    # A plain zarr client sees the same layout.
    g = zarr.open_group(str(store_path), mode="r")
    assert sorted(g["cases"].group_keys()) == s.case_ids()


def test_format_version_mismatch_raises(store_path):
    _set_root_attr(store_path, "format_version", FORMAT_VERSION + 1)
    with pytest.raises(StoreError, match=r"format_version .* expects"):
        Store.open(store_path)


def test_missing_or_foreign_store_raises(tmp_path):
    with pytest.raises(StoreError, match="no zarr.json"):
        Store.open(tmp_path / "nope.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a distseg store"):
        Store.open(tmp_path / "plain.zarr")


def test_unknown_case_raises_naming_it(store_path):
    with pytest.raises(StoreError, match="no case 'nope'"):
        Store.open(store_path).case("nope")


@pytest.mark.parametrize("evil", ["../../outside", "/abs/path", "ok\n"])
def test_a_tampered_index_cannot_lead_case_ids_outside_their_folder(store_path, evil):
    """Case ids name output files (predictions, probability caches): an index.json listing a path is refused."""
    index = json.loads((store_path / "index.json").read_text())
    index["cases"][evil] = next(iter(index["cases"].values()))
    (store_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(StoreError, match="not a safe folder name") as err:
        Store.open(store_path).case_ids()
    assert str(store_path) in str(err.value)


def test_folds_filtering(store_path):
    s = Store.open(store_path)
    ids = s.case_ids()
    assert len(ids) == 4
    for cid in ids:
        assert s.case(cid).fold == fold_of(cid, 3)
    by_fold = {f: s.case_ids(folds=[f]) for f in range(3)}
    assert sorted(sum(by_fold.values(), [])) == ids
    assert s.case_ids(exclude_folds=[0]) == sorted(set(ids) - set(by_fold[0]))


def test_read_patch_out_of_bounds_is_zero_padded(store_path):
    s = Store.open(store_path)
    cid = s.case_ids()[0]
    info = s.case(cid)
    image, label = s.read_case(cid)
    c, z, y, x = info.shape
    start, size = (-3, y - 5, -2), (8, 9, x + 4)
    pi, pl = s.read_patch(cid, start, size)
    assert pi.shape == (c, *size) and pi.dtype == np.float32 and pl.shape == size and pl.dtype == np.uint8
    padded_i = np.pad(image, ((0, 0), (3, 8), (0, 9), (2, 8)))
    padded_l = np.pad(label, ((3, 8), (0, 9), (2, 8)))
    np.testing.assert_array_equal(pi, padded_i[:, 0:8, y - 5 : y + 4, 0 : x + 4])
    np.testing.assert_array_equal(pl, padded_l[0:8, y - 5 : y + 4, 0 : x + 4])
    assert not pi[:, :3].any() and not pl[:, 5:].any()  # the padded parts are exactly zero
    # Entirely outside: all zeros, right shape.
    oi, ol = s.read_patch(cid, (z + 10, 0, 0), (4, 4, 4))
    assert oi.shape == (c, 4, 4, 4) and not oi.any() and not ol.any()


def test_normalisation_is_zscore_over_brain(store_path, brats_src):
    s = Store.open(store_path)
    cid = s.case_ids()[1]
    info = s.case(cid)
    image, _ = s.read_case(cid)
    vols = [np.asanyarray(nib.load(brats_src / cid / f"{cid}_{m}.nii.gz").dataobj).astype(np.float64)
            for m in ("t1", "t1ce", "t2", "flair")]
    brain = np.any([v != 0 for v in vols], axis=0)
    for ch, v in enumerate(vols):
        mean, std = v[brain].mean(), v[brain].std()
        assert info.attrs["normalization"]["mean"][ch] == pytest.approx(mean, rel=1e-6)
        assert info.attrs["normalization"]["std"][ch] == pytest.approx(std, rel=1e-6)
        expected = np.where(brain, (v - mean) / std, 0.0).transpose(2, 1, 0)
        box = tuple(slice(lo, hi) for lo, hi in info.attrs["crop_box_zyx"])
        np.testing.assert_allclose(image[ch], expected[box], atol=1e-4)
    brain_zyx = image.any(axis=0)
    assert abs(image[:, brain_zyx].mean(axis=1)).max() < 1e-4
    np.testing.assert_allclose(image[:, brain_zyx].std(axis=1), 1.0, atol=1e-4)


def test_foreground_coords_point_at_their_class(store_path):
    s = Store.open(store_path)
    for cid in s.case_ids():
        _, label = s.read_case(cid)
        for cls in (1, 2, 3):
            pts = s.foreground(cid, cls)
            assert pts.ndim == 2 and pts.shape[1] == 3
            assert len(pts) == min(int((label == cls).sum()), 10_000)
            if len(pts):
                assert (label[pts[:, 0], pts[:, 1], pts[:, 2]] == cls).all()
    assert s.foreground(s.case_ids()[0], 7).shape == (0, 3)


def test_undo_reconstructs_source_label(store_path, brats_src):
    s = Store.open(store_path)
    for cid in s.case_ids():
        _, label = s.read_case(cid)
        seg = np.asanyarray(nib.load(brats_src / cid / f"{cid}_seg.nii.gz").dataobj)
        np.testing.assert_array_equal(restore_to_source_geometry(label, s.case(cid).attrs), seg)


def test_store_is_usable_after_fork(store_path):
    """A Store opened (and used) in the parent keeps working in a forked loader worker."""
    import multiprocessing as mp

    s = Store.open(store_path)
    cid = s.case_ids()[0]
    ref, _ = s.read_patch(cid, (0, 0, 0), (4, 4, 4))
    global _INHERITED
    _INHERITED = s  # inherited through fork, not pickled
    with mp.get_context("fork").Pool(1) as pool:
        got = pool.apply(_read_sum_inherited, (cid,))
    assert got == pytest.approx(float(ref.sum()), rel=1e-6)
    # DataLoader workers under spawn pickle the dataset (and its Store): that must work too.
    clone = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(clone.read_patch(cid, (0, 0, 0), (4, 4, 4))[0], ref)


_INHERITED: Store | None = None


def _read_sum_inherited(cid: str) -> float:
    assert _INHERITED is not None
    inherited = list(_INHERITED._arrays.values())  # the parent's handles, their shard files open (copies)
    assert inherited and all(a.source._fd is not None for a in inherited)
    total = float(_INHERITED.read_patch(cid, (0, 0, 0), (4, 4, 4))[0].sum())
    assert all(a.source._fd is None for a in inherited), "a forked worker must close its copies of the parent's files"
    return total


@pytest.fixture
def chunked_path(brats_src: Path, tmp_path: Path, run_cli) -> Path:
    """The layout written before sharding (one file per chunk): what stores written before issue 14 hold."""
    assert run_cli("brats", "--src", str(brats_src), "--dst", str(tmp_path / "old"), "--name", "s", "--folds", "3",
                   "--layout", "chunked") == 0
    return tmp_path / "old" / "s.zarr"


@pytest.mark.parametrize("layout", ["sharded", "chunked"])
def test_direct_readers_match_zarr(store_path, chunked_path, layout):
    """The direct readers return exactly what zarr returns, incl. edge and never-written chunks, for today's sharded
    layout and the chunked one written before it."""
    path = store_path if layout == "sharded" else chunked_path
    s = Store.open(path)
    rng = np.random.default_rng(0)
    for cid in s.case_ids():
        for name in ("image", "label", "foreground"):
            fast = s._array(cid, name)
            sharded = layout == "sharded" and name != "foreground"
            assert type(fast).__name__ == ("ShardReader" if sharded else "ChunkReader")
            ref = zarr.open_array(str(path / "cases" / cid / name), mode="r")
            np.testing.assert_array_equal(fast[...], ref[...])
            for _ in range(25):
                sel = tuple(slice(*sorted(int(v) for v in rng.integers(0, n + 1, 2))) for n in ref.shape)
                np.testing.assert_array_equal(fast[sel], ref[sel])
            files = [p for p in (path / "cases" / cid / name).iterdir() if p.name.startswith("c.")]
            if sharded:  # one object per case and array
                assert [p.name for p in files] == ["c." + ".".join(["0"] * ref.ndim)]
    # Empty label chunks are not written (fill value); the synthetic volumes have some: the path above read them.
    omitted = [json.loads((path / "cases" / c / "label" / "zarr.json").read_text())["attributes"]["omitted_chunks"]
               for c in s.case_ids()]
    assert any(omitted)
    if layout == "chunked":
        assert any(len([p for p in (path / "cases" / c / "label").iterdir() if p.name.startswith("c.")])
                   < -(-s.case(c).shape[1] // 4) for c in s.case_ids())


def test_a_damaged_shard_is_an_error_naming_the_case(store_path):
    s = Store.open(store_path)
    cid = s.case_ids()[0]
    shard = store_path / "cases" / cid / "label" / "c.0.0.0"
    blob = shard.read_bytes()
    shard.write_bytes(blob[:-3] + bytes([blob[-3] ^ 1]) + blob[-2:])  # one bit of the index checksum flipped
    with pytest.raises(StoreError, match=rf"case '{cid}' array 'label': shard .*c.0.0.0 has a corrupt index"):
        Store.open(store_path).read_case(cid)
    shard.write_bytes(blob[-10:])  # cut short: shorter than its index
    with pytest.raises(StoreError, match=rf"case '{cid}' array 'label': shard .* is 10 bytes.*truncated"):
        Store.open(store_path).read_case(cid)
    shard.write_bytes(blob[-(len(blob) // 2):])  # the index is intact, the chunks before it are cut
    with pytest.raises(StoreError, match=rf"case '{cid}'.*(truncated|corrupt)"):
        Store.open(store_path).read_case(cid)
    shard.unlink()
    with pytest.raises(StoreError, match=rf"case '{cid}' array 'label': shard .*c.0.0.0 is missing"):
        Store.open(store_path).read_case(cid)
    shard.write_bytes(blob)
    np.testing.assert_array_equal(Store.open(store_path).read_case(cid)[1], s.read_case(cid)[1])


def test_both_codecs_store_the_same_data(store_path, brats_src, tmp_path, run_cli):
    """Default Blosc-lz4 and `--codec zstd` differ only in the chunk codec: same arrays, readable by plain zarr."""
    dst = tmp_path / "z"
    assert run_cli("brats", "--src", str(brats_src), "--dst", str(dst), "--name", "s", "--codec", "zstd") == 0
    zstd_path = dst / "s.zarr"
    a, b = Store.open(store_path), Store.open(zstd_path)
    assert a.case_ids() == b.case_ids()
    for case_id in a.case_ids():
        names = {}
        for path in (store_path, zstd_path):
            meta = json.loads((path / "cases" / case_id / "image" / "zarr.json").read_text())
            codecs = meta["codecs"][0]["configuration"]["codecs"]  # the shard's inner-chunk codecs
            blosc = [c for c in codecs if c["name"] == "blosc"]
            names[path] = blosc[0]["configuration"]["cname"]
            raw = zarr.open_array(str(path / "cases" / case_id / "image"), mode="r")[...]
            assert raw.dtype == np.int16
        assert names == {store_path: "lz4", zstd_path: "zstd"}
        (ia, la), (ib, lb) = a.read_case(case_id), b.read_case(case_id)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)


def test_a_lost_chunk_file_is_an_error_naming_the_case_but_an_omitted_one_reads_as_zeros(chunked_path):
    store_path = chunked_path
    s = Store.open(store_path)
    cid = s.case_ids()[0]
    label_dir = store_path / "cases" / cid / "label"
    omitted = json.loads((label_dir / "zarr.json").read_text())["attributes"]["omitted_chunks"]
    written = sorted(p.name for p in label_dir.glob("c.*"))
    assert written, "the synthetic case has tumour, so some label chunks are written"
    image, label = Store.open(store_path).read_case(cid)  # every omitted chunk reads as zeros
    chunks = json.loads((label_dir / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"]
    for idx in omitted:
        box = tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, chunks, strict=True))
        assert not label[box].any()
    assert len(omitted) + len(written) == int(np.prod([-(-n // c) for n, c in zip(label.shape, chunks,
                                                                                   strict=True)]))

    (label_dir / written[0]).unlink()  # truncated store: a chunk the writer wrote is gone
    with pytest.raises(StoreError, match=rf"case '{cid}' array 'label': chunk file .*{written[0]} is missing"):
        Store.open(store_path).read_case(cid)
    image_dir = store_path / "cases" / cid / "image"
    next(image_dir.glob("c.*")).unlink()
    with pytest.raises(StoreError, match=rf"case '{cid}' array 'image'"):
        Store.open(store_path).read_patch(cid, (0, 0, 0), tuple(image.shape[1:]))

    # an array from an older writer (no omitted_chunks attribute) keeps reading missing chunks as zeros
    meta = json.loads((label_dir / "zarr.json").read_text())
    del meta["attributes"]["omitted_chunks"]
    (label_dir / "zarr.json").write_text(json.dumps(meta))
    assert Store.open(store_path).read_patch(cid, (0, 0, 0), (4, 4, 4))[1] is not None


def test_the_case_index_replaces_reading_every_case(store_path):
    """A finished preprocessing run leaves index.json; readers then take every case's attrs from it: listing,
    filtering and `case()` open no case's zarr.json (a patch of a case reads it once, for its arrays' metadata)."""
    index = json.loads((store_path / "index.json").read_text())
    listed = sorted(p.name for p in (store_path / "cases").iterdir() if (p / "zarr.json").is_file())
    assert sorted(index["cases"]) == listed and index["format_version"] == FORMAT_VERSION
    fresh = Store.open(store_path)
    before = {c: fresh.case(c).attrs for c in fresh.case_ids()}
    for cid in listed:  # make every case's own attributes wrong: the index alone must serve them
        meta = store_path / "cases" / cid / "zarr.json"
        doc = json.loads(meta.read_text())
        doc["attributes"] = {"fold": 99}
        meta.write_text(json.dumps(doc))
    s = Store.open(store_path)
    assert s.case_ids() == listed and s.case_ids(folds=[0]) == fresh.case_ids(folds=[0])
    assert {c: s.case(c).attrs for c in listed} == before
    assert s.read_patch(listed[0], (0, 0, 0), (8, 8, 8))[0].shape == (4, 8, 8, 8)
    assert s.case(listed[0]).attrs == before[listed[0]]
    # without the index (a preprocessing run has started) the reader goes back to each case's own file
    from distseg.data.index import remove_index

    remove_index(store_path)
    assert Store.open(store_path).case_ids(folds=[99]) == listed
    (store_path / "cases" / listed[0] / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match=rf"cases/{listed[0]}/zarr.json: unreadable metadata of case"):
        Store.open(store_path).case_ids()
