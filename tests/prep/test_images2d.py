"""2D image/mask conversion: both real layouts, channel policy, masks -> {0,1}, resize, unpaired files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from distseg.data.geometry import restore_to_source_geometry
from distseg.data.store import Store
from preprocess.discover import discover_images2d
from preprocess.synth import write_synth


def test_figshare_layout_side_by_side_mask_suffix(shared_data, tmp_path, run_cli, manifest):
    src = shared_data / "seg2d" / "figshare-cheng"
    assert run_cli("images2d", "--src", str(src), "--dst", str(tmp_path), "--name", "fig") == 0
    s = Store.open(tmp_path / "fig.zarr")
    assert s.kind == "images2d" and s.channels == ["gray"]  # RGBA with equal R=G=B: channel 0
    assert s.case_ids() == ["3000", "3005", "3010", "3015", "3020", "3025"]
    rows = manifest(tmp_path / "fig.manifest.parquet")
    for cid in s.case_ids():
        info = s.case(cid)
        assert info.shape == (1, 1, 512, 512) and rows[cid]["status"] == "ok"
        image, label = s.read_case(cid)
        src_img = np.asarray(Image.open(src / f"{cid}.png"))[..., 0].astype(np.float64)
        np.testing.assert_allclose(image[0, 0], (src_img - src_img.mean()) / src_img.std(), atol=1e-4)
        src_mask = np.asarray(Image.open(src / f"{cid}_mask.png"))[..., 0]
        np.testing.assert_array_equal(label[0], (src_mask > 0).astype(np.uint8))
        assert info.attrs["label_convention"] == "binary255"
        np.testing.assert_array_equal(restore_to_source_geometry(label, info.attrs), src_mask)


def test_lgg_layout_images_and_masks_folders(shared_data, tmp_path, run_cli, caplog):
    src = shared_data / "seg2d" / "lgg-tcga"
    assert run_cli("images2d", "--src", str(src), "--dst", str(tmp_path), "--name", "lgg") == 0
    # slices <patient>_<n> at the root: each its own subject, which can split a patient across folds: said so
    assert "carry slice numbers" in caplog.text and "--subject-regex" in caplog.text
    s = Store.open(tmp_path / "lgg.zarr")
    assert s.channels == ["r", "g", "b"]  # three distinct sequences in the RGB TIFFs
    ids = s.case_ids()
    assert len(ids) == 4
    nonempty = 0
    for cid in ids:
        image, label = s.read_case(cid)
        assert image.shape == (3, 1, 256, 256)
        mask = np.asarray(Image.open(src / "masks" / f"{cid}_mask.tif"))
        np.testing.assert_array_equal(label[0], (mask > 0).astype(np.uint8))
        nonempty += bool(label.any())
    assert nonempty == 1  # 3 of the 4 real masks are empty


def test_gray_mode_refuses_colour_images_and_rgb_mode_replicates_gray(shared_data, tmp_path, run_cli, manifest):
    lgg = shared_data / "seg2d" / "lgg-tcga"
    assert run_cli("images2d", "--src", str(lgg), "--dst", str(tmp_path), "--name", "g", "--channels", "gray") == 3
    rows = manifest(tmp_path / "g.manifest.parquet")
    assert all(r["status"] == "failed" and "--channels rgb" in r["error"] for r in rows.values())
    fig = shared_data / "seg2d" / "figshare-cheng"
    assert run_cli("images2d", "--src", str(fig), "--dst", str(tmp_path), "--name", "c", "--channels", "rgb") == 0
    image, _ = Store.open(tmp_path / "c.zarr").read_case("3000")
    assert image.shape[0] == 3
    np.testing.assert_array_equal(image[0], image[2])


def test_resize_and_undo(shared_data, tmp_path, run_cli):
    src = shared_data / "seg2d" / "figshare-cheng"
    assert run_cli("images2d", "--src", str(src), "--dst", str(tmp_path), "--name", "r", "--size", "128") == 0
    s = Store.open(tmp_path / "r.zarr")
    info = s.case("3000")
    image, label = s.read_case("3000")
    assert image.shape == (1, 1, 128, 128) and label.shape == (1, 128, 128)
    assert set(np.unique(label).tolist()) <= {0, 1} and label.any()
    back = restore_to_source_geometry(label, info.attrs)
    src_mask = np.asarray(Image.open(src / "3000_mask.png"))[..., 0]
    assert back.shape == src_mask.shape
    assert np.mean((back > 0) == (src_mask > 0)) > 0.99  # nearest down/up-sampling: only boundary pixels move


def test_unpaired_files_are_failed_rows_and_same_name_layout(tmp_path, run_cli, manifest):
    src = tmp_path / "src"
    write_synth("images2d", 3, src, seed=1, shape=(40, 48))
    (src / "masks" / "case_0001.png").unlink()  # image without mask
    shutil.copy(src / "masks" / "case_0002.png", src / "masks" / "orphan.png")  # mask without image
    assert run_cli("images2d", "--src", str(src), "--dst", str(tmp_path / "o"), "--name", "u") == 3
    rows = manifest(tmp_path / "o" / "u.manifest.parquet")
    assert rows["case_0000"]["status"] == "ok" and rows["case_0002"]["status"] == "ok"
    assert rows["case_0001"]["status"] == "failed" and "image without a mask" in rows["case_0001"]["error"]
    assert "case_0001.png" in rows["case_0001"]["error"]
    assert rows["orphan"]["status"] == "failed" and "mask without an image" in rows["orphan"]["error"]
    s = Store.open(tmp_path / "o" / "u.zarr")
    assert s.case_ids() == ["case_0000", "case_0002"]
    _, label = s.read_case("case_0000")
    assert label.shape == (1, 40, 48) and label.any()


def test_discovery_pairs_every_layout(tmp_path):
    img = Image.fromarray(np.zeros((8, 8), dtype=np.uint8))
    for rel in ("a/images/x1.png", "a/masks/x1.png", "b/images/x2.jpg", "b/masks/x2_mask.png",
                "c/x3.tif", "c/x3_mask.tif", "d/x4.png"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p)
    cases = {c.case_id: c for c in discover_images2d(tmp_path)}
    assert sorted(cases) == ["x1", "x2", "x3", "x4"]
    for cid in ("x1", "x2", "x3"):
        assert set(cases[cid].files) == {"image", "mask"} and not cases[cid].problems
    assert cases["x4"].problems and "image without a mask" in cases["x4"].problems[0]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "I;16"])
def test_image_modes_load(tmp_path, mode):
    from preprocess.images2d import load_image

    arr = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 3)
    im = Image.fromarray(arr).convert(mode) if mode != "I;16" else Image.fromarray(arr.astype(np.uint16) * 100)
    p = tmp_path / ("x.png" if mode != "I;16" else "x.tif")
    im.save(p)
    a = load_image(p)
    assert a.ndim == 3 and a.shape[:2] == (8, 8) and a.shape[2] in (1, 3)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "1", "I;16", "F", "CMYK"])
def test_tiff_modes_load_like_pillow(tmp_path, mode):
    """TIFFs go through tifffile (grayscale/RGB) or Pillow (palette, CMYK, ...): same pixels either way."""
    from preprocess.images2d import load_image

    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    im = Image.fromarray(arr.astype(np.uint16) * 100) if mode == "I;16" else Image.fromarray(arr).convert(mode)
    p = tmp_path / "x.tif"
    im.save(p)
    expected = np.asarray(im.convert("RGB") if mode in ("P", "CMYK") else im)
    expected = expected[..., None] if expected.ndim == 2 else expected[..., :1] if mode == "LA" else expected[..., :3]
    np.testing.assert_array_equal(load_image(p), expected)
