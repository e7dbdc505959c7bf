"""Reader side of the preprocessed-dataset store (Zarr v3 group on shared storage).

Layout written by `preprocess` (see `.notes/preprocess.md` for the measured choices)::

    <dst>/<name>.zarr/
        zarr.json                      root attrs: format_version, kind, channels, label_values, regions, ...
        cases/<case_id>/zarr.json      case attrs: geometry + undo info, normalisation stats, fold, checksums,
                                       subject (patient; folds are per subject), slice_index (2D)
        cases/<case_id>/image          (C, Z, Y, X) raw source intensities (int16 / uint8 / float32), chunked
        cases/<case_id>/label          (Z, Y, X) uint8, canonical label values (absent for unlabelled cases)
        cases/<case_id>/foreground     (N, 3) int16 (z, y, x) sampled voxel coords; rows per class in attrs
        .tmp/                          cases being written; renamed into `cases/` only when complete
        index.json                     every complete case's attrs, written by a preprocessing run that finished
                                       (removed when the next one starts): one read instead of one per case

Opening a store with an index reads one file; without one (older stores, or a preprocessing run in progress or
killed) the reader lists `cases/` and reads each case's zarr.json lazily, as before.

Images are stored as the cropped *original* intensities (lossless, compresses far better than normalised floats);
the z-score is applied here on read: ``(raw - mean[c]) / std[c]`` inside the normalisation mask, 0 outside.
This module never imports `preprocess` or `ray`; a `Store` is cheap to open and each DataLoader worker should open
its own (zarr array handles are cached per process id, so an inherited object is also safe after fork).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FORMAT_VERSION: int = 1
"""Bump when the on-disk layout or attribute meaning changes; readers refuse other versions."""

CASES_GROUP = "cases"
TMP_DIR = ".tmp"
INDEX_FILE = "index.json"
OMITTED_CHUNKS = "omitted_chunks"
"""Array attribute: chunk indices the writer left out because they were all fill value. With it, any other
missing chunk file is damage (an error); arrays from older writers lack it and read missing chunks as fill."""

BRATS_CHANNELS = ["t1", "t1ce", "t2", "flair"]
BRATS_LABEL_VALUES = {"0": "background", "1": "necrosis", "2": "edema", "3": "enhancing"}
BRATS_REGIONS = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
BINARY_LABEL_VALUES = {"0": "background", "1": "tumour"}
BINARY_REGIONS = {"tumour": [1]}

# Stored (canonical) label -> source label, per source convention; used to write predictions back.
LABEL_CONVENTIONS: dict[str, dict[int, int]] = {
    "brats2018": {0: 0, 1: 1, 2: 2, 3: 4},  # BraTS 2018-2021: enhancing tumour is 4
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 3},  # BraTS 2023+: enhancing tumour is 3
    "binary255": {0: 0, 1: 255},
    "binary01": {0: 0, 1: 1},
}


class StoreError(Exception):
    """A store, case or attribute is missing or not what this reader expects (the message names which)."""


@dataclass(frozen=True)
class CaseInfo:
    """One stored case. `shape` is the stored image shape (C, Z, Y, X); `spacing` is (z, y, x) in mm."""

    case_id: str
    shape: tuple[int, int, int, int]
    spacing: tuple[float, float, float]
    fold: int
    has_label: bool
    attrs: dict[str, Any] = field(repr=False)
    subject: str | None = None
    """The patient (folds are per subject); None: the case is its own subject (stores written before subjects)."""
    slice_index: int | None = None
    """2D slices: position in the subject's volume (the source name's trailing `_<n>`); None when unknown."""


@dataclass
class CaseArrays:
    """One case in memory, with exactly the attributes a stored case has (see the module docstring).

    Made by the store (`Store.case_arrays`) or, for raw scans, by the converter's own per-case functions
    (`preprocess.brats.prepare_brats_case`, `preprocess.images2d.prepare_2d_case`), so the predictor sees the same
    thing either way. `image` is the stored (un-normalised) (C, Z, Y, X) array; `label` (Z, Y, X) uint8 canonical
    values or None.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    attrs: dict[str, Any]

    def normalised(self) -> np.ndarray:
        """float32 (C, Z, Y, X) z-scored exactly as the store reader does for training."""
        return normalise(self.image, self.attrs["normalization"])


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _ChunkReader:
    """Direct reader for the arrays this project writes: regular chunk grid, little-endian bytes, one Blosc or Zstd
    codec. It decodes chunk files with numcodecs in the calling thread, skipping zarr's async machinery, which
    costs ~1/3 of a 4x128^3 patch read (see .notes/preprocess.md); anything else goes through zarr.
    """

    def __init__(self, path: Path, meta: dict[str, Any], what: str = "") -> None:
        self.path = path
        self.what = what or str(path)  # "case 'X' array 'image'", for error messages
        omitted = meta.get("attributes", {}).get(OMITTED_CHUNKS)
        self.omitted = None if omitted is None else {tuple(int(i) for i in idx) for idx in omitted}
        self.shape = tuple(meta["shape"])
        self.chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.fill = meta.get("fill_value", 0)
        enc = meta["chunk_key_encoding"]
        sep = enc.get("configuration", {}).get("separator", "/")
        self.prefix = "c" + sep if enc["name"] == "default" else ""
        self.sep = sep
        import numcodecs

        codec = meta["codecs"][1]
        if codec["name"] == "blosc":
            self.decode = numcodecs.Blosc().decode
        else:
            self.decode = numcodecs.Zstd().decode

    @staticmethod
    def supports(meta: dict[str, Any]) -> bool:
        codecs = meta.get("codecs", [])
        return (
            meta.get("chunk_grid", {}).get("name") == "regular"
            and meta.get("chunk_key_encoding", {}).get("name") == "default"
            and len(codecs) == 2
            and codecs[0].get("name") == "bytes"
            and codecs[0].get("configuration", {}).get("endian", "little") == "little"
            and codecs[1].get("name") in ("blosc", "zstd")
            and not meta.get("storage_transformers")
        )

    def __getitem__(self, sel: Any) -> np.ndarray:
        sel = () if sel is Ellipsis else sel if isinstance(sel, tuple) else (sel,)
        if not all(isinstance(s, slice) and s.step in (None, 1) for s in sel):
            raise StoreError(f"{self.path}: only contiguous slices are supported, got {sel!r}")
        sel = sel + (slice(None),) * (len(self.shape) - len(sel))
        box = [s.indices(n)[:2] for s, n in zip(sel, self.shape, strict=True)]
        out = np.empty(tuple(hi - lo for lo, hi in box), dtype=self.dtype)
        ranges = [range(lo // c, (hi - 1) // c + 1) if hi > lo else range(0) for (lo, hi), c in
                  zip(box, self.chunks, strict=True)]
        for idx in np.ndindex(*[len(r) for r in ranges]):
            cidx = [r[i] for r, i in zip(ranges, idx, strict=True)]
            src, dst = [], []
            for (lo, hi), c, ci in zip(box, self.chunks, cidx, strict=True):
                a, b = max(lo, ci * c), min(hi, (ci + 1) * c)
                src.append(slice(a - ci * c, b - ci * c))
                dst.append(slice(a - lo, b - lo))
            key = self.prefix + self.sep.join(str(i) for i in cidx)
            try:
                blob = (self.path / key).read_bytes()
            except FileNotFoundError:
                if self.omitted is not None and tuple(cidx) not in self.omitted:
                    raise StoreError(
                        f"{self.what}: chunk file {self.path / key} is missing but the writer wrote it (truncated or "
                        "damaged store); re-run `python -m preprocess ... --force` for this case"
                    ) from None
                out[tuple(dst)] = self.fill  # never written because it was all fill value (or an older writer)
                continue
            chunk = np.frombuffer(self.decode(blob), dtype=self.dtype).reshape(self.chunks)
            out[tuple(dst)] = chunk[tuple(src)]
        return out


class Store:
    """Read-only view of a preprocessed dataset. Open with `Store.open(path)`."""

    def __init__(self, path: Path, attrs: dict[str, Any]) -> None:
        self.path = path
        self.attrs = attrs
        self.kind: str = attrs["kind"]
        self.channels: list[str] = list(attrs["channels"])
        self.regions: dict[str, list[int]] = {k: list(v) for k, v in attrs["regions"].items()}
        self._case_attrs: dict[str, dict[str, Any]] = {}
        self._indexed = False
        self._arrays: dict[tuple[str, str], Any] = {}
        self._pid = os.getpid()
        self._load_index()

    def _load_index(self) -> None:
        """Take every case's attrs from `index.json` when a finished preprocessing run left one."""
        try:
            index = _read_json(self.path / INDEX_FILE)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            logger.warning("%s: unreadable %s (%s); reading each case's metadata instead", self.path, INDEX_FILE, e)
            return
        if index.get("format_version") != FORMAT_VERSION or not isinstance(index.get("cases"), dict):
            logger.warning("%s: %s is not a version-%d case index; reading each case's metadata instead",
                           self.path, INDEX_FILE, FORMAT_VERSION)
            return
        self._case_attrs = dict(index["cases"])
        self._indexed = True

    def __getstate__(self) -> dict[str, Any]:
        # Zarr handles are per process; a pickled Store (spawned loader worker) reopens them lazily.
        return {**self.__dict__, "_arrays": {}}

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Store:
        """Open `<dst>/<name>.zarr`. Raises StoreError when missing, not a distseg store or another format version."""
        p = Path(path).expanduser().resolve()
        meta_path = p / "zarr.json"
        if not meta_path.is_file():
            raise StoreError(f"{p}: not a Zarr v3 store (no zarr.json); expected the output of `python -m preprocess`")
        try:
            meta = _read_json(meta_path)
        except (OSError, ValueError) as e:
            raise StoreError(f"{meta_path}: unreadable store metadata ({e})") from e
        attrs = meta.get("attributes", {})
        version = attrs.get("format_version")
        if version is None:
            raise StoreError(f"{p}: not a distseg store (root attrs lack 'format_version')")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{p}: store format_version {version} but this reader expects {FORMAT_VERSION}; "
                "re-run `python -m preprocess` with this version of distseg"
            )
        for key in ("kind", "channels", "label_values", "regions"):
            if key not in attrs:
                raise StoreError(f"{p}: root attrs lack required key {key!r}")
        return cls(p, attrs)

    # ---- case listing and metadata -------------------------------------------------------------------------
    def _all_case_ids(self) -> list[str]:
        if self._indexed:
            return sorted(self._case_attrs)
        cases_dir = self.path / CASES_GROUP
        if not cases_dir.is_dir():
            return []
        # A case directory counts only once its group metadata exists; writers rename complete cases into place.
        return sorted(d for d in os.listdir(cases_dir) if (cases_dir / d / "zarr.json").is_file())

    def case_attrs(self, case_id: str) -> dict[str, Any]:
        """The case group's attributes (cached)."""
        attrs = self._case_attrs.get(case_id)
        if attrs is None:
            meta_path = self.path / CASES_GROUP / case_id / "zarr.json"
            if not meta_path.is_file():
                raise StoreError(f"{self.path}: no case {case_id!r} (expected {meta_path})")
            attrs = _read_json(meta_path).get("attributes", {})
            self._case_attrs[case_id] = attrs
        return attrs

    def case_ids(
        self,
        folds: Iterable[int] | None = None,
        exclude_folds: Iterable[int] | None = None,
        labelled_only: bool = False,
    ) -> list[str]:
        """Sorted ids of complete cases, optionally restricted to / excluding folds, or to labelled cases."""
        keep = None if folds is None else set(folds)
        drop = set() if exclude_folds is None else set(exclude_folds)
        out = []
        for cid in self._all_case_ids():
            a = self.case_attrs(cid)
            fold = int(a.get("fold", -1))
            if keep is not None and fold not in keep:
                continue
            if fold in drop or (labelled_only and not a.get("has_label", False)):
                continue
            out.append(cid)
        return out

    def subjects(
        self,
        folds: Iterable[int] | None = None,
        exclude_folds: Iterable[int] | None = None,
        labelled_only: bool = False,
    ) -> dict[str, list[str]]:
        """{subject: its case ids ordered by slice index (then id)} over `case_ids(...)` with the same filters.

        A case without a subject is its own subject (key = its case id), matching the fold rule. Reads every
        selected case's attrs once (cached), so it costs one small JSON read per case; `open` stays cheap.
        """
        groups: dict[str, list[tuple[int, int, str]]] = {}
        for cid in self.case_ids(folds, exclude_folds, labelled_only):
            a = self.case_attrs(cid)
            index = a.get("slice_index")
            # Slices without an index sort after indexed ones, by id.
            key = (0, int(index), cid) if index is not None else (1, 0, cid)
            groups.setdefault(a.get("subject") or cid, []).append(key)
        return {s: [cid for *_, cid in sorted(keys)] for s, keys in sorted(groups.items())}

    def read_subject(self, subject: str, case_ids: list[str] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """A subject's 2D slices stacked in slice order: image float32 (C, S, H, W), label uint8 (S, H, W) or None.

        `case_ids` (default `subjects()[subject]`) gives the slices and their order. Each slice is z-scored with its
        own statistics, exactly as training reads it. Raises StoreError for an unknown subject, slices of different
        sizes or a mix of labelled and unlabelled slices.
        """
        if case_ids is None:
            case_ids = self.subjects().get(subject, [])
        if not case_ids:
            raise StoreError(f"{self.path}: no cases for subject {subject!r}")
        images, labels = [], []
        for cid in case_ids:
            image, label = self.read_case(cid)
            c, z, h, w = image.shape
            if z != 1 or (images and (c, h, w) != (images[0].shape[0], *images[0].shape[2:])):
                want = f"like {case_ids[0]!r} {images[0].shape}" if images else "(C, 1, H, W)"
                raise StoreError(f"{self.path}: subject {subject!r}: case {cid!r} has shape {image.shape}; expected "
                                 f"2D slices of one size, {want}")
            if labels and (label is None) != (labels[0] is None):
                raise StoreError(f"{self.path}: subject {subject!r}: case {cid!r} labelled={label is not None} "
                                 f"unlike {case_ids[0]!r}; expected all slices labelled or none")
            images.append(image)
            labels.append(label)
        image = np.concatenate(images, axis=1)
        label = None if labels[0] is None else np.concatenate(labels, axis=0)
        return image, label

    def case(self, case_id: str) -> CaseInfo:
        a = self.case_attrs(case_id)
        try:
            return CaseInfo(
                case_id=case_id,
                shape=tuple(int(s) for s in a["shape"]),  # type: ignore[arg-type]
                spacing=tuple(float(s) for s in a["spacing"]),  # type: ignore[arg-type]
                fold=int(a.get("fold", -1)),
                has_label=bool(a["has_label"]),
                attrs=a,
                subject=a.get("subject"),
                slice_index=a.get("slice_index"),
            )
        except KeyError as e:
            raise StoreError(f"{self.path}: case {case_id!r} attrs lack key {e.args[0]!r}") from e

    # ---- array access ----------------------------------------------------------------------------------------
    def _array(self, case_id: str, name: str) -> Any:
        if os.getpid() != self._pid:  # forked into a loader worker: never reuse the parent's zarr handles
            self._arrays.clear()
            self._pid = os.getpid()
        key = (case_id, name)
        arr = self._arrays.get(key)
        if arr is None:
            p = self.path / CASES_GROUP / case_id / name
            try:
                meta = _read_json(p / "zarr.json")
            except FileNotFoundError:
                raise StoreError(f"{self.path}: case {case_id!r} has no array {name!r} (expected {p})") from None
            if _ChunkReader.supports(meta):
                arr = _ChunkReader(p, meta, f"{self.path}: case {case_id!r} array {name!r}")
            else:
                import zarr  # deferred: keeps `Store.open` cheap

                arr = zarr.open_array(str(p), mode="r")
            self._arrays[key] = arr
        return arr

    def foreground(self, case_id: str, cls: int, dtype: np.typing.DTypeLike = np.int64) -> np.ndarray:
        """(N, 3) (z, y, x) voxel coordinates (stored frame) sampled from class `cls`; (0, 3) if absent.

        `dtype`: int64 by default; np.int16 keeps the stored type (no widening copy: 6 bytes per voxel, what the
        training sampler caches)."""
        rows = self.case_attrs(case_id).get("foreground_rows", {}).get(str(int(cls)))
        if not rows or rows[1] <= rows[0]:
            return np.zeros((0, 3), dtype=dtype)
        return np.asarray(self._array(case_id, "foreground")[rows[0] : rows[1]], dtype=dtype)

    def _normalise(self, case_id: str, raw: np.ndarray) -> np.ndarray:
        try:
            return normalise(raw, self.case_attrs(case_id)["normalization"])
        except ValueError as e:
            raise StoreError(f"{self.path}: case {case_id!r}: {e}") from e

    def read_patch(
        self, case_id: str, start: tuple[int, int, int], size: tuple[int, int, int]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Image float32 (C, *size) normalised and label uint8 (*size) (None when unlabelled).

        `start` is (z, y, x) in the stored frame and may be negative; the part of the box outside the volume
        is zero-padded (image 0, label 0).
        """
        info = self.case(case_id)
        spatial = info.shape[1:]
        if len(start) != 3 or len(size) != 3:
            raise StoreError(f"read_patch({case_id!r}): start and size must be (z, y, x); got {start}, {size}")
        src, dst = [], []
        for s, n, dim in zip(start, size, spatial, strict=True):
            lo, hi = max(int(s), 0), min(int(s) + int(n), dim)
            if hi <= lo:  # no overlap at all
                src, dst = None, None
                break
            src.append(slice(lo, hi))
            dst.append(slice(lo - int(s), hi - int(s)))
        c = info.shape[0]
        inside = src is not None and all(d.start == 0 and d.stop == n for d, n in zip(dst, size, strict=True))
        if inside:  # no padding: hand back the decoded arrays without another copy
            image = self._normalise(case_id, self._array(case_id, "image")[(slice(None), *src)])
            label = np.asarray(self._array(case_id, "label")[tuple(src)]) if info.has_label else None
            return image, label
        image = np.zeros((c, *size), dtype=np.float32)
        label = np.zeros(tuple(size), dtype=np.uint8) if info.has_label else None
        if src is None:
            return image, label
        image[(slice(None), *dst)] = self._normalise(case_id, self._array(case_id, "image")[(slice(None), *src)])
        if label is not None:
            label[tuple(dst)] = self._array(case_id, "label")[tuple(src)]
        return image, label

    def case_arrays(self, case_id: str) -> CaseArrays:
        """The whole case as stored (raw image, label or None) with its attributes."""
        info = self.case(case_id)
        image = np.asarray(self._array(case_id, "image")[...])
        label = np.asarray(self._array(case_id, "label")[...]) if info.has_label else None
        return CaseArrays(case_id, image, label, dict(info.attrs))

    def read_case(self, case_id: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The whole case: image float32 (C, Z, Y, X) normalised, label uint8 (Z, Y, X) or None."""
        info = self.case(case_id)
        image = self._normalise(case_id, self._array(case_id, "image")[...])
        label = np.asarray(self._array(case_id, "label")[...]) if info.has_label else None
        return image, label


def normalise(raw: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    """raw (C, Z, Y, X) stored intensities -> float32 z-scored (C, Z, Y, X), 0 outside the normalisation mask.

    `norm` is a case's ``normalization`` attribute (per-channel ``mean``/``std`` and the ``mask`` rule). The one
    implementation shared by the store reader and the predictor's in-memory cases, so training and inference see
    identical inputs.
    """
    if norm.get("applied", False):  # stored already normalised
        return raw.astype(np.float32)
    if norm["mask"] not in ("nonzero_any", "all"):
        raise ValueError(f"unknown normalization mask {norm['mask']!r}; expected 'nonzero_any' or 'all'")
    scale = 1.0 / np.asarray(norm["std"], dtype=np.float64)
    offset = (-np.asarray(norm["mean"], dtype=np.float64) * scale).astype(np.float32)
    scale = scale.astype(np.float32)
    out = np.empty(raw.shape, dtype=np.float32)
    # Work in z-slabs of ~256k voxels so the int16 input, mask and float32 output stay in cache: ~2x faster
    # than whole-array numpy passes on a 4x128^3 patch.
    plane = max(1, int(np.prod(raw.shape[2:])))
    step = max(1, (1 << 18) // plane)
    for z0 in range(0, raw.shape[1], step):
        r, o = raw[:, z0 : z0 + step], out[:, z0 : z0 + step]
        mask = None
        if norm["mask"] == "nonzero_any":  # brain = nonzero in any modality; background stays exactly 0
            mask = r[0] != 0
            for c in range(1, r.shape[0]):
                mask |= r[c] != 0
        for c in range(r.shape[0]):
            np.multiply(r[c], scale[c], out=o[c], casting="unsafe")
            o[c] += offset[c]
            if mask is not None:
                o[c] *= mask
    return out


PREVIOUS_INDEX = ".index.json.previous"
"""Where `remove_index` parks the index during a preprocessing run (readers never open it)."""


def write_index(store_path: Path) -> int:
    """Write `<store>/index.json` with every complete case's attrs (atomically); returns the number of cases.
    Called by the preprocessing driver once all its cases are written (`remove_index` when a run starts). When the
    content equals the index parked by `remove_index` (a rerun that changed nothing), that file is put back as it
    was, so an unchanged store stays byte- and timestamp-identical."""
    cases_dir = store_path / CASES_GROUP
    cases = {}
    for cid in sorted(os.listdir(cases_dir)) if cases_dir.is_dir() else []:
        try:
            cases[cid] = _read_json(cases_dir / cid / "zarr.json").get("attributes", {})
        except (FileNotFoundError, NotADirectoryError):  # the group's own zarr.json, or not a complete case
            continue
    data = json.dumps({"format_version": FORMAT_VERSION, "cases": cases}, separators=(",", ":")).encode("utf-8")
    previous = store_path / PREVIOUS_INDEX
    try:
        if previous.read_bytes() == data:
            previous.replace(store_path / INDEX_FILE)
            return len(cases)
    except FileNotFoundError:
        pass
    tmp = store_path / f".{INDEX_FILE}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    tmp.replace(store_path / INDEX_FILE)
    previous.unlink(missing_ok=True)
    return len(cases)


def remove_index(store_path: Path) -> None:
    """Take the case index away before cases change, so readers never trust a stale one (it is parked under
    `PREVIOUS_INDEX` for `write_index` to compare with)."""
    with contextlib.suppress(FileNotFoundError):
        (store_path / INDEX_FILE).replace(store_path / PREVIOUS_INDEX)


def to_source_convention(label: np.ndarray, convention: str) -> np.ndarray:
    """Map canonical stored labels back to a source convention (e.g. brats2018: 3 -> 4). Same shape, uint8."""
    if convention not in LABEL_CONVENTIONS:
        raise StoreError(f"unknown label convention {convention!r}; expected one of {sorted(LABEL_CONVENTIONS)}")
    lut = np.zeros(256, dtype=np.uint8)
    for stored, source in LABEL_CONVENTIONS[convention].items():
        lut[stored] = source
    return lut[np.asarray(label, dtype=np.uint8)]


def restore_to_source_geometry(label: np.ndarray, attrs: dict[str, Any], source_convention: bool = True) -> np.ndarray:
    """Undo crop + axis transpose for a stored-frame label volume (Z, Y, X), e.g. a prediction.

    Returns the volume in the source array order (NIfTI: (X, Y, Z), to be saved with `attrs["affine"]`; 2D: (H, W)
    at the original size) in the source label convention when `source_convention` is true.
    """
    out = paste_to_source(np.asarray(label), attrs)
    if source_convention:
        out = to_source_convention(out, attrs["label_convention"])
    return out


def paste_to_source(volume: np.ndarray, attrs: dict[str, Any]) -> np.ndarray:
    """A stored-frame array (Z, Y, X) of any dtype -> the source grid: pasted into the uncropped volume (0 outside
    the crop box), transposed to the source axis order, and for resized 2D cases resized back to the source size
    (nearest for integer/bool labels, bilinear for floating-point maps such as probabilities)."""
    expected = tuple(attrs["shape"][1:])
    if volume.shape != expected:
        raise StoreError(f"case {attrs.get('case_id')!r}: array shape {volume.shape} != stored shape {expected}")
    if attrs.get("resized_from") is not None:  # 2D case resized on conversion: back to the source size
        from PIL import Image

        h, w = attrs["resized_from"]
        if volume.dtype.kind == "f":
            im = Image.fromarray(volume[0].astype(np.float32), mode="F").resize((w, h), Image.BILINEAR)
            volume = np.asarray(im).astype(volume.dtype)[None]
        else:
            im = Image.fromarray(volume[0].astype(np.uint8)).resize((w, h), Image.NEAREST)
            volume = np.asarray(im).astype(volume.dtype)[None]
    full = np.zeros(tuple(attrs["original_shape_zyx"]), dtype=volume.dtype)
    box = tuple(slice(lo, hi) for lo, hi in attrs["crop_box_zyx"])
    full[box] = volume
    out = full.transpose(attrs["store_to_source_axes"])
    if attrs.get("source_ndim") == 2:  # 2D sources are stored with Z = 1
        out = out[0]
    return out
