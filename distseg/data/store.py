"""Reader side of the preprocessed-dataset store (Zarr v3 group on shared storage).

Layout written by `preprocess` (see `.notes/preprocess.md` for the measured choices)::

    <dst>/<name>.zarr/
        zarr.json                      root attrs: format_version, kind, channels, label_values, regions, ...
        cases/<case_id>/zarr.json      case attrs: geometry + undo info, normalisation stats, fold, checksums,
                                       subject (patient; folds are per subject), slice_index (2D); and its
                                       arrays' metadata (inline `consolidated_metadata`, since 2026-12-08)
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
Beside it: `layout` (names, format version, `StoreError`), `chunks` (the direct chunk reader), `normalise`,
`index` (index.json), `labels` (label conventions, regions), `geometry` (back to the source grid).
This module never imports `preprocess` or `ray`. A `Store` is cheap to open and safe to hand to DataLoader workers:
zarr array handles are cached per process id (an inherited object reopens them after fork; a pickled one drops
them), and the cache is bounded (`MAX_OPEN_ARRAYS`, least recently used first out), so a rank that samples
100 000 cases does not hold 100 000 handles. A sharded array's handle keeps its one shard file open: the first
patch of a case opens 3 files (the case's zarr.json, one per shard), later patches none (issue 14: opens are what a
shared file system's metadata server pays for).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distseg.data.chunks import ChunkReader
from distseg.data.index import load_index
from distseg.data.layout import CASES_GROUP, FORMAT_VERSION, SPLITS, TEST_FOLD, StoreError, validate_case_id
from distseg.data.location import LocalLocation, Location, open_location
from distseg.data.normalise import normalise
from distseg.data.shards import ShardReader


def case_split(attrs: dict[str, Any]) -> str:
    """A stored case's split: its `split` attr; a fold of `TEST_FOLD` also means "test" (stores written before the
    attr have neither, and all their cases are "train")."""
    split = attrs.get("split")
    if split is None:
        return "test" if int(attrs.get("fold", 0)) == TEST_FOLD else "train"
    return str(split)


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
    split: str = "train"
    """"train" (the cross-validation pool) or "test" (set aside at preprocessing; see `distseg.data.layout.SPLITS`)."""


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


class Store:
    """Read-only view of a preprocessed dataset. Open with `Store.open(path)`."""

    MAX_OPEN_ARRAYS = 256
    """Array handles kept open per process (metadata parsed, shard indexes cached), least recently used dropped."""

    def __init__(self, path: Path | str, attrs: dict[str, Any], location: Location | None = None) -> None:
        self.path = path
        """The store's folder (Path) or its ``s3://bucket/prefix`` URL (str)."""
        self.location: Location = location if location is not None else LocalLocation(path)
        self.attrs = attrs
        self.kind: str = attrs["kind"]
        self.channels: list[str] = list(attrs["channels"])
        self.regions: dict[str, list[int]] = {k: list(v) for k, v in attrs["regions"].items()}
        self._case_attrs: dict[str, dict[str, Any]] = {}
        self._case_arrays: OrderedDict[str, dict[str, Any] | None] = OrderedDict()
        """A case's consolidated array metadata ({name: zarr.json document}; None: its zarr.json has none), bounded."""
        self._indexed = False
        self._arrays: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._pid = os.getpid()
        self._load_index()

    def _load_index(self) -> None:
        """Take every case's attrs from `index.json` when a finished preprocessing run left one."""
        cases = load_index(self.path if isinstance(self.location, LocalLocation) else self.location)
        if cases is not None:
            self._case_attrs = cases
            self._indexed = True

    def __getstate__(self) -> dict[str, Any]:
        # Zarr handles are per process; a pickled Store (spawned loader worker) reopens them lazily.
        return {**self.__dict__, "_arrays": OrderedDict(), "_case_arrays": OrderedDict()}

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Store:
        """Open `<dst>/<name>.zarr` (a folder or ``s3://bucket/prefix/<name>.zarr``). Raises StoreError when missing,
        not a distseg store or another format version."""
        location = open_location(path)
        p: Path | str = location.root if isinstance(location, LocalLocation) else location.url
        meta_path = f"{location.url}/zarr.json"
        try:
            meta = location.read_json("zarr.json")
        except FileNotFoundError:
            if not isinstance(location, LocalLocation):
                location.check_access()  # a missing bucket or refused credentials say so, not "no zarr.json"
            raise StoreError(f"{p}: not a Zarr v3 store (no zarr.json); expected the output of `python -m preprocess`"
                             ) from None
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
        return cls(p, attrs, location)

    # ---- case listing and metadata -------------------------------------------------------------------------
    def _all_case_ids(self) -> list[str]:
        if self._indexed:
            ids = sorted(self._case_attrs)
        else:
            # A case counts only once its group metadata exists: writers rename complete cases into place (POSIX) or
            # put the case's zarr.json after every array object (object storage).
            ids = sorted(d for d in self.location.list_dir(CASES_GROUP)
                         if self.location.exists(f"{CASES_GROUP}/{d}/zarr.json"))
        for cid in ids:  # ids name output files downstream: a tampered index must not lead outside their folder
            try:
                validate_case_id(cid)
            except ValueError as e:
                raise StoreError(f"{self.path}: {e} (listed in its {'index' if self._indexed else 'cases'})") from None
        return ids

    def case_attrs(self, case_id: str) -> dict[str, Any]:
        """The case group's attributes (cached)."""
        attrs = self._case_attrs.get(case_id)
        if attrs is None:
            attrs = self._read_case_group(case_id).get("attributes", {})
            self._case_attrs[case_id] = attrs
        return attrs

    def _read_case_group(self, case_id: str) -> dict[str, Any]:
        """The case group's zarr.json document; its consolidated array metadata is kept (bounded) for `_array`."""
        key = f"{CASES_GROUP}/{case_id}/zarr.json"
        try:
            doc = self.location.read_json(key)
        except FileNotFoundError:
            raise StoreError(f"{self.path}: no case {case_id!r} (expected {self.location.url}/{key})") from None
        except ValueError as e:
            raise StoreError(f"{self.location.url}/{key}: unreadable metadata of case {case_id!r} ({e}); re-run "
                             "`python -m preprocess ... --force` for this case") from None
        consolidated = doc.get("consolidated_metadata")
        arrays = consolidated.get("metadata") if isinstance(consolidated, dict) and consolidated.get(
            "kind") == "inline" else None
        self._case_arrays[case_id] = arrays if isinstance(arrays, dict) else None
        self._case_arrays.move_to_end(case_id)
        if len(self._case_arrays) > self.MAX_OPEN_ARRAYS:
            self._case_arrays.popitem(last=False)
        return doc

    def _array_meta(self, case_id: str, name: str) -> dict[str, Any]:
        """An array's zarr.json document: from the case group's consolidated metadata (stores written since
        2026-12-08: one read per case) or else the array's own zarr.json."""
        folder = f"{CASES_GROUP}/{case_id}/{name}"
        if case_id not in self._case_arrays:
            self._read_case_group(case_id)
        arrays = self._case_arrays.get(case_id)
        if arrays is not None and name in arrays:
            return arrays[name]
        try:  # no consolidated metadata (older stores), or it does not list this array
            return self.location.read_json(f"{folder}/zarr.json")
        except FileNotFoundError:
            raise StoreError(f"{self.path}: case {case_id!r} has no array {name!r} (expected "
                             f"{self.location.url}/{folder})") from None
        except ValueError as e:
            raise StoreError(f"{self.location.url}/{folder}/zarr.json: unreadable metadata of case {case_id!r} "
                             f"array {name!r} ({e})") from None

    def case_ids(
        self,
        folds: Iterable[int] | None = None,
        exclude_folds: Iterable[int] | None = None,
        labelled_only: bool = False,
        split: str | None = "train",
    ) -> list[str]:
        """Sorted ids of complete cases, optionally restricted to / excluding folds, or to labelled cases.

        `split`: "train" (default: the cross-validation pool; test-split cases are never returned, so nothing that
        trains, validates or chooses can see them by accident), "test" (only the test split) or None (every case).
        """
        if split is not None and split not in SPLITS:
            raise StoreError(f"split: expected one of {', '.join(SPLITS)} or None, got {split!r}")
        keep = None if folds is None else set(folds)
        drop = set() if exclude_folds is None else set(exclude_folds)
        out = []
        for cid in self._all_case_ids():
            a = self.case_attrs(cid)
            if split is not None and case_split(a) != split:
                continue
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
        split: str | None = "train",
    ) -> dict[str, list[str]]:
        """{subject: its case ids ordered by slice index (then id)} over `case_ids(...)` with the same filters.

        A case without a subject is its own subject (key = its case id), matching the fold rule. Reads every
        selected case's attrs once (cached), so it costs one small JSON read per case; `open` stays cheap.
        """
        groups: dict[str, list[tuple[int, int, str]]] = {}
        for cid in self.case_ids(folds, exclude_folds, labelled_only, split):
            a = self.case_attrs(cid)
            index = a.get("slice_index")
            # Slices without an index sort after indexed ones, by id.
            key = (0, int(index), cid) if index is not None else (1, 0, cid)
            groups.setdefault(a.get("subject") or cid, []).append(key)
        return {s: [cid for *_, cid in sorted(keys)] for s, keys in sorted(groups.items())}

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
                split=case_split(a),
                subject=a.get("subject"),
                slice_index=a.get("slice_index"),
            )
        except KeyError as e:
            raise StoreError(f"{self.path}: case {case_id!r} attrs lack key {e.args[0]!r}") from e

    # ---- array access ----------------------------------------------------------------------------------------
    def _array(self, case_id: str, name: str) -> Any:
        if os.getpid() != self._pid:  # forked into a loader worker: never reuse the parent's handles
            for arr in self._arrays.values():  # the parent's open shard files: this process's copies of them
                if isinstance(arr, ShardReader):
                    arr.close()
            self._arrays.clear()
            self._pid = os.getpid()
        key = (case_id, name)
        arr = self._arrays.get(key)
        if arr is not None:
            self._arrays.move_to_end(key)
        else:
            folder = f"{CASES_GROUP}/{case_id}/{name}"
            meta = self._array_meta(case_id, name)
            what = f"{self.path}: case {case_id!r} array {name!r}"
            local = isinstance(self.location, LocalLocation)
            if ShardReader.supports(meta):
                arr = ShardReader(self.location.source(folder), meta, what)
            elif local and ChunkReader.supports(meta):
                arr = ChunkReader(self.location.root / folder, meta, what)
            else:
                import zarr  # deferred: keeps `Store.open` cheap

                arr = (zarr.open_array(str(self.location.root / folder), mode="r") if local else
                       zarr.open_array(self.location.store, path=folder, mode="r"))
            self._arrays[key] = arr
            if len(self._arrays) > self.MAX_OPEN_ARRAYS:
                (old_case, _), dropped = self._arrays.popitem(last=False)
                if isinstance(dropped, ShardReader):
                    dropped.close()  # its open shard file
                if not any(c == old_case for c, _ in self._arrays):
                    # its metadata goes with its last handle: a case republished meanwhile is read afresh, whole
                    self._case_arrays.pop(old_case, None)
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

    def read_label(self, case_id: str) -> np.ndarray:
        """The whole label uint8 (Z, Y, X); StoreError for an unlabelled case."""
        if not self.case(case_id).has_label:
            raise StoreError(f"{self.path}: case {case_id!r} has no label")
        return np.asarray(self._array(case_id, "label")[...])

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
