"""Convert one 2D image + mask pair into the store (Z = 1). Pure: no Ray.

Channels are decided once per dataset (`decide_channels`) so every case has the same C:
- gray: 1 channel. Grayscale as-is; colour images whose channels are all equal (e.g. the figshare RGBA PNGs) use
  channel 0; a colour image with distinct channels fails with a reason pointing at `--channels rgb`.
- rgb: 3 channels. Alpha is dropped, grayscale is replicated x3, palettes are expanded.
`--channel-names` renames them (e.g. pre,flair,post for the LGG TIFFs); the count must match.
TIFFs are decoded by tifffile (exact, and strict about truncated or corrupt files), other formats by Pillow.
Masks become {0, 1}: {0,1} masks as-is ("binary01"), anything else is thresholded at half range ("binary255").
Images keep their source dtype (uint8 usually) and get per-channel mean/std over the whole image in attrs; the
reader z-scores on read. `--size S` resizes to SxS (image bilinear, mask nearest); attrs record the source size.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from distseg.data.labels import BINARY_LABEL_VALUES, BINARY_REGIONS
from distseg.data.store import CaseArrays
from preprocess.common import CaseError, placement, precheck, result_row, sample_foreground, source_fingerprints
from preprocess.discover import SourceCase
from preprocess.nifti import sha256_file
from preprocess.writer import Layout, root_attrs_base, write_case

logger = logging.getLogger(__name__)

CHANNEL_NAMES = {"gray": ["gray"], "rgb": ["r", "g", "b"]}
AUTO_PROBE = 32  # images inspected by --channels auto


def images2d_root_attrs(channels: list[str], size: int | None) -> dict[str, Any]:
    attrs = root_attrs_base("images2d", channels, dict(BINARY_LABEL_VALUES), dict(BINARY_REGIONS))
    attrs["resize"] = size
    return attrs


def load_image(path: Path) -> np.ndarray:
    """(H, W, K) array, K in {1, 3}: alpha dropped, palettes expanded. Raises CaseError naming the file."""
    a = _read_tiff(path) if path.suffix.lower() in (".tif", ".tiff") else None
    if a is None:
        a = _read_pil(path)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4) or 0 in a.shape:
        raise CaseError(f"{path}: image array shape {a.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
    if a.shape[2] == 2:  # gray + alpha
        a = a[..., :1]
    if a.shape[2] == 4:
        a = a[..., :3]
    if a.dtype == bool:
        a = a.astype(np.uint8)
    return a


def _one_line(e: BaseException) -> str:
    name = type(e).__name__
    if name == "error":  # zlib.error, struct.error: say which
        name = f"{type(e).__module__}.{name}"
    return " ".join(f"{name}: {e}".split())


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise CaseError(f"{path}: unreadable image ({_one_line(e)}); expected a complete PNG, JPEG or TIFF") from e


class _CollectWarnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


def _read_tiff(path: Path) -> np.ndarray | None:
    """First page of a grayscale/RGB(A) TIFF, decoded by tifffile; None for other photometrics (PIL converts them).

    tifffile rather than PIL because it is strict: PIL (libtiff) returns a corrupt deflate strip as wrong pixels
    without an error, tifffile raises on the zlib check. A file cut before its directory (written last by many
    writers) makes tifffile log a warning and find no pages; that warning becomes the reason of the CaseError.
    """
    import tifffile

    tiff_logger = logging.getLogger("tifffile")
    collected = _CollectWarnings()
    tiff_logger.addHandler(collected)
    propagate, tiff_logger.propagate = tiff_logger.propagate, False  # reported in the reason, not as stray logs
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.pages:
                why = collected.messages[0] if collected.messages else "no image directory"
                raise CaseError(f"{path}: unreadable TIFF, no image found ({why}); expected a complete TIFF file "
                                "(truncated or corrupt?)")
            page = tif.pages.first
            if page.photometric not in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB):
                return None
            a = page.asarray()
            if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and a.ndim == 3:
                a = np.moveaxis(a, 0, -1)  # (S, H, W) -> (H, W, S)
            return a
    except CaseError:
        raise
    except Exception as e:  # tifffile raises many types (TiffFileError, zlib.error, ValueError, ...)
        raise CaseError(f"{path}: unreadable TIFF ({_one_line(e)}); expected a complete, uncorrupted TIFF "
                        "image") from e
    finally:
        tiff_logger.removeHandler(collected)
        tiff_logger.propagate = propagate

def binarize_mask(m: np.ndarray) -> tuple[np.ndarray, str]:
    """A 2D mask (H, W) of any integer/float dtype -> ({0, 1} uint8 (H, W), source convention).

    {0, 1} masks are kept as they are ("binary01"); anything else is foreground above half range: > 127 for uint8,
    > max / 2 otherwise ("binary255"). The evaluator reads ground-truth and predicted masks with this same rule.
    """
    if set(np.unique(m).tolist()) <= {0, 1}:
        return m.astype(np.uint8), "binary01"
    half = 127 if m.dtype == np.uint8 else float(m.max()) / 2
    return (m > half).astype(np.uint8), "binary255"


def is_colour(a: np.ndarray) -> bool:
    return a.shape[2] == 3 and not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2]))


def decide_channels(cases: list[SourceCase], mode: str) -> list[str]:
    """Channel names for the whole dataset (see module doc); `auto` inspects up to AUTO_PROBE images."""
    if mode != "auto":
        return list(CHANNEL_NAMES[mode])
    probed = 0
    for case in cases:
        if "image" not in case.files or probed >= AUTO_PROBE:
            continue
        probed += 1
        try:
            if is_colour(load_image(case.files["image"])):
                return list(CHANNEL_NAMES["rgb"])
        except CaseError:
            continue  # reported when the case itself is converted
    return list(CHANNEL_NAMES["gray"])


def _to_channels(a: np.ndarray, channels: list[str], path: Path) -> np.ndarray:
    if len(channels) == 1:
        if is_colour(a):
            raise CaseError(f"{path}: colour image with distinct R/G/B channels but the dataset is converted as "
                            "grayscale; expected --channels rgb (or only grayscale images)")
        return a[..., :1]
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def _resize(a: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """(H, W) -> (size, size); uint8 stays uint8, anything else is resized as float32."""
    from PIL import Image

    im = Image.fromarray(a) if a.dtype == np.uint8 else Image.fromarray(a.astype(np.float32), mode="F")
    out = im.resize((size, size), Image.NEAREST if nearest else Image.BILINEAR)
    return np.asarray(out)


def convert_2d_case(case: SourceCase, store_path: Path, fold: int, layout: Layout, channels: list[str],
                    size: int | None, force: bool = False) -> dict[str, Any]:
    """Convert (or skip when unchanged) one image/mask pair; never raises for bad input. Returns a manifest row."""
    t0 = time.perf_counter()
    image_path = case.files.get("image") or case.files.get("mask")
    source = str(image_path) if image_path else ""
    try:
        existing = precheck(case, source, store_path, fold, force)
        if existing is not None and existing.get("channels") == channels and existing.get("resize") == size:
            return result_row(case.case_id, "skipped", attrs=existing, seconds=time.perf_counter() - t0)
        attrs = _convert(case, store_path, fold, layout, channels, size)
    except CaseError as e:
        return result_row(case.case_id, "failed", str(e), source=source, seconds=time.perf_counter() - t0)
    except Exception as e:  # unforeseen: still a row
        logger.exception("case %s failed", case.case_id)
        return result_row(case.case_id, "failed", f"{source}: {type(e).__name__}: {e}", source=source,
                          seconds=time.perf_counter() - t0)
    return result_row(case.case_id, "ok", attrs=attrs, seconds=time.perf_counter() - t0)


def _convert(case: SourceCase, store_path: Path, fold: int, layout: Layout, channels: list[str],
             size: int | None) -> dict[str, Any]:
    fingerprints = source_fingerprints(case.files)
    prepared, foreground = prepare_2d_case(case, channels, size, fold)
    attrs = prepared.attrs
    attrs["sources"] = {k: {**fp, "sha256": sha256_file(case.files[k])} for k, fp in fingerprints.items()}
    write_case(store_path, case.case_id, prepared.image, prepared.label, foreground, attrs, layout)
    return attrs


def prepare_2d_case(case: SourceCase, channels: list[str], size: int | None, fold: int = -1
                    ) -> tuple[CaseArrays, dict[int, np.ndarray]]:
    """Load, check and describe one 2D image (+ mask when the case has one) in memory, without writing.

    The one code path shared by conversion and by prediction from raw images: image (C, 1, H', W') in its source
    dtype, label (1, H', W') uint8 {0, 1} or None, and the store attributes (H', W' = `size` when resizing).
    Raises CaseError naming the file for bad input.
    """
    if case.problems and "mask" in case.files:
        raise CaseError("; ".join(case.problems))
    if "image" not in case.files:
        raise CaseError("; ".join(case.problems) or f"{case.case_id}: no image file")
    ipath = case.files["image"]
    mpath = case.files.get("mask")
    img = _to_channels(load_image(ipath), channels, ipath)
    h, w = img.shape[:2]
    convention, mask, counts_src = "binary255", None, None
    if mpath is not None:
        m = load_image(mpath).max(axis=2)  # white-on-black masks in any colour mode
        if img.shape[:2] != m.shape:
            raise CaseError(f"{mpath}: mask size {m.shape} differs from image {ipath.name} {img.shape[:2]}; "
                            "expected one pixel grid")
        values = np.unique(m)
        mask, convention = binarize_mask(m)
        counts_src = {str(int(v)): int((m == v).sum()) for v in values[:16]}
    if size is not None and (h, w) != (size, size):
        img = np.stack([_resize(img[..., c], size, nearest=False) for c in range(img.shape[2])], axis=2)
        mask = _resize(mask, size, nearest=True) if mask is not None else None
    image = np.ascontiguousarray(np.moveaxis(img, 2, 0)[:, None])  # (C, 1, H, W)
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise CaseError(f"{ipath}: non-finite pixel values; expected finite intensities")
    label = mask[None] if mask is not None else None  # (1, H, W)
    flat = image.reshape(image.shape[0], -1).astype(np.float64)
    means = flat.mean(axis=1)
    stds = flat.std(axis=1)
    attrs: dict[str, Any] = {
        "case_id": case.case_id,
        "source_dir": str(ipath.parent),
        "naming": "images2d",
        "label_convention": convention,
        "channels": channels,
        "resize": size,
        "resized_from": [h, w] if size is not None and (h, w) != (size, size) else None,
        "source_image": ipath.name,
        "original_shape_zyx": [1, h, w],
        "affine": None,
        "spacing": [1.0, 1.0, 1.0],
        "crop_box_zyx": [[0, 1], [0, h], [0, w]],
        "store_to_source_axes": [0, 1, 2],
        "source_ndim": 2,
        "image_dtype": image.dtype.name,
        "normalization": {"mean": means.tolist(), "std": [float(s) if s > 0 else 1.0 for s in stds],
                          "mask": "all", "applied": False},
        **placement(case, fold),
        "has_label": label is not None,
        "shape": list(image.shape),
    }
    foreground: dict[int, np.ndarray] = {}
    if label is not None:
        attrs["label_counts"] = {str(i): int((label == i).sum()) for i in (0, 1)}
        attrs["label_counts_source"] = counts_src
        foreground = sample_foreground(label, [1], case.case_id)
    return CaseArrays(case.case_id, image, label, attrs), foreground
