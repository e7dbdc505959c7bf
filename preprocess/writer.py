"""Writer side of the store contract (`distseg.data.store`): root init, atomic case writes, temp cleanup.

A case is written into `<store>/.tmp/<case_id>.<random>` and renamed into `<store>/cases/<case_id>` only when every
array and attribute is on disk, so readers (which list `cases/`) never see a half-written case. A run killed
mid-case leaves only `.tmp/` debris, which `clean_temp` removes at the start of the next run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distseg.data.layout import CASES_GROUP, FORMAT_VERSION, OMITTED_CHUNKS, TMP_DIR, StoreError, validate_case_id
from distseg.data.location import is_remote

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Layout:
    """Chunking and compression of stored arrays (defaults chosen by measurement, see .notes/preprocess.md)."""

    chunks_zyx: tuple[int, int, int] = (4, 256, 256)
    """Spatial chunk (z, y, x) of image and label; the image chunk spans all channels."""
    cname: str = "lz4"
    """Blosc inner compressor. lz4 (default) decodes ~2x faster than zstd per patch (random 4x128^3 reads 28x vs
    16-20x a NIfTI load), writes faster, at 0.97x the .nii.gz bytes; zstd (clevel 1) is 15 % smaller."""
    clevel: int = 5
    """Blosc compression level (for zstd use 1: Blosc maps it to zstd level 1, ~2.5x faster to write than 3, +2 %)."""
    shuffle: str = "shuffle"
    """Blosc shuffle filter: "shuffle" | "bitshuffle" | "noshuffle"."""
    sharded: bool = True
    """Store image and label as one Zarr v3 shard each (`sharding_indexed`, index at the end), the chunks above
    being its inner chunks: a case is a handful of objects and a patch costs one open per array on POSIX (index and
    merged byte ranges through it; the reader keeps it open) or <= 2 requests (index once, then the merged ranges)
    instead of one per chunk. False: one file per chunk (the layout before issue 14, still read)."""
    image_shuffle_1byte: str = "bitshuffle"
    """Shuffle filter for 1-byte images (2D uint8 sources), where byte shuffle does nothing. Bit shuffle stores the
    LGG TIFF pixels in 1.14x the deflate-TIFF bytes instead of 1.40x at the same decode speed (0.19 ms per 3x256^2
    slice). Labels keep `shuffle`: on BraTS label volumes bit shuffle is 16 % smaller but decodes 2.6x slower."""


def path_or_url(text: str) -> Path | str:
    """A `--dst`-style argument: ``s3://bucket/prefix`` stays a URL, anything else becomes an absolute Path
    (workers on other nodes must see the same path)."""
    return text.rstrip("/") if is_remote(text) else Path(text).expanduser().resolve()


def _check_compatible(store_path: Path | str, attrs: dict[str, Any], root_attrs: dict[str, Any]) -> None:
    for key in ("format_version", "kind"):
        if attrs.get(key) != root_attrs[key]:
            raise StoreError(
                f"{store_path}: existing store has {key}={attrs.get(key)!r} but this run writes "
                f"{root_attrs[key]!r}; use another --name or --dst"
            )
    if attrs.get("channels") != root_attrs["channels"]:
        raise StoreError(
            f"{store_path}: existing store has channels {attrs.get('channels')} but this run writes "
            f"{root_attrs['channels']}; use another --name or --dst"
        )


def init_store(store_path: Path | str, root_attrs: dict[str, Any]) -> None:
    """Create the root group (or check an existing one is compatible: same format_version and kind)."""
    import zarr

    if is_remote(store_path):
        from preprocess import bucket

        bucket.init_store(str(store_path), root_attrs, lambda attrs: _check_compatible(store_path, attrs, root_attrs))
        return
    meta = store_path / "zarr.json"
    if meta.is_file():
        _check_compatible(store_path, json.loads(meta.read_text()).get("attributes", {}), root_attrs)
        zarr.open_group(str(store_path), mode="r+").attrs.update(root_attrs)
    else:
        store_path.mkdir(parents=True, exist_ok=True)
        zarr.open_group(str(store_path), mode="w", attributes=root_attrs)
    root = zarr.open_group(str(store_path), mode="r+")
    if CASES_GROUP not in root:
        root.create_group(CASES_GROUP)
    (store_path / TMP_DIR).mkdir(exist_ok=True)


def root_attrs_base(
    kind: str, channels: list[str], label_values: dict[str, str], regions: dict[str, list[int]]
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "channels": channels,
        "label_values": label_values,
        "regions": regions,
        "axes": ["c", "z", "y", "x"],
    }


def read_case_doc(store_path: Path | str, case_id: str) -> dict[str, Any] | None:
    """A complete case's group zarr.json (attributes, consolidated array metadata), or None when the case is not
    (yet) in the store or its metadata is unreadable (then it is redone)."""
    if is_remote(store_path):
        from preprocess import bucket

        return bucket.read_case_doc(str(store_path), case_id)
    meta = store_path / CASES_GROUP / case_id / "zarr.json"
    try:
        return json.loads(meta.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # unreadable metadata: treat as absent so the case is redone
        return None


def add_consolidated(store_path: Path | str, case_id: str) -> None:
    """Give a complete case written before 2026-12-08 its arrays' metadata in its group zarr.json (what
    `consolidate_case` writes for new cases), in place and atomically (POSIX: temp file + rename; bucket: one PUT,
    `preprocess.bucket.add_consolidated`): a rerun thus upgrades an older store to 3 opens per first patch."""
    if is_remote(store_path):
        from preprocess import bucket

        bucket.add_consolidated(str(store_path), case_id)
        return
    consolidate_case(store_path / CASES_GROUP / case_id)


def consolidated_doc(group: dict[str, Any], arrays: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The case group document `group` with `arrays` ({name: array zarr.json}) as its inline consolidated metadata
    (zarr-python's format, ``must_understand: false``)."""
    return {**group, "consolidated_metadata": {"kind": "inline", "must_understand": False, "metadata": arrays}}


def update_case_attrs(store_path: Path | str, case_id: str, updates: dict[str, Any]) -> None:
    """Update a complete case's attrs in place, atomically (temp file + rename of its zarr.json)."""
    if is_remote(store_path):
        from preprocess import bucket

        bucket.update_case_attrs(str(store_path), case_id, updates)
        return
    meta = store_path / CASES_GROUP / case_id / "zarr.json"
    doc = json.loads(meta.read_text())
    doc.setdefault("attributes", {}).update(updates)
    tmp = meta.with_name(f".zarr.json.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, meta)


# Flat chunk file names (`c.0.1.0.0`) instead of nested folders: fewer directories to create, list and delete.
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}


def _compressors(layout: Layout, shuffle: str) -> list[Any]:
    from zarr.codecs import BloscCodec

    return [BloscCodec(cname=layout.cname, clevel=layout.clevel, shuffle=shuffle)]


def write_case(
    store_path: Path | str,
    case_id: str,
    image: np.ndarray,
    label: np.ndarray | None,
    foreground: dict[int, np.ndarray],
    attrs: dict[str, Any],
    layout: Layout,
) -> None:
    """Write one case atomically. image (C, Z, Y, X), label (Z, Y, X) uint8 or None, foreground {cls: (N, 3)}.

    POSIX: into ``<store>/.tmp/`` then renamed into ``cases/``. Object storage: into a local temporary folder, then
    uploaded with the case's ``zarr.json`` last (`preprocess.bucket.upload_case`)."""
    import zarr

    validate_case_id(case_id)
    remote = is_remote(store_path)
    if remote:
        tmp = Path(tempfile.mkdtemp(prefix=f"distseg-{case_id}.")) / case_id
    else:
        tmp = store_path / TMP_DIR / f"{case_id}.{uuid.uuid4().hex}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        rows: dict[str, list[int]] = {}
        coords = []
        n = 0
        for cls in sorted(foreground):
            pts = np.asarray(foreground[cls], dtype=np.int16).reshape(-1, 3)
            rows[str(cls)] = [n, n + len(pts)]
            coords.append(pts)
            n += len(pts)
        attrs = {**attrs, "foreground_rows": rows, "has_label": label is not None, "shape": list(image.shape)}
        group = zarr.open_group(str(tmp), mode="w", attributes=attrs)
        c = image.shape[0]
        chunks = tuple(min(a, b) for a, b in zip(layout.chunks_zyx, image.shape[1:], strict=True))
        image_shuffle = layout.image_shuffle_1byte if image.dtype.itemsize == 1 else layout.shuffle
        _write_array(group, "image", image, (c, *chunks), layout, image_shuffle, ["c", "z", "y", "x"],
                     layout.sharded)
        if label is not None:
            _write_array(group, "label", np.ascontiguousarray(label, dtype=np.uint8), chunks, layout, layout.shuffle,
                         ["z", "y", "x"], layout.sharded)
        fg = np.concatenate(coords) if coords else np.zeros((0, 3), dtype=np.int16)
        _write_array(group, "foreground", fg, (max(len(fg), 1), 3), layout, layout.shuffle, None, False)
        consolidate_case(tmp)
        if remote:
            from preprocess import bucket

            bucket.upload_case(str(store_path), case_id, tmp)
        else:
            _publish(store_path, case_id, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if remote:
            shutil.rmtree(tmp.parent, ignore_errors=True)


def consolidate_case(folder: Path) -> None:
    """Copy the case's array metadata into its group ``zarr.json`` (zarr-python's inline ``consolidated_metadata``,
    ``must_understand: false``), so a reader learns every array of the case from one file: the first patch of a
    case then opens 3 files (this one and one per shard) instead of 5. The arrays' own ``zarr.json`` stay, for
    readers that ignore the field. Atomic (temp file + rename), so it may also upgrade a published case in place."""
    meta = folder / "zarr.json"
    arrays = {child.name: json.loads((child / "zarr.json").read_text())
              for child in sorted(folder.iterdir()) if (child / "zarr.json").is_file()}
    tmp = folder / f".zarr.json.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(consolidated_doc(json.loads(meta.read_text()), arrays), indent=2))
    os.replace(tmp, meta)


def _write_array(group: Any, name: str, data: np.ndarray, chunks: tuple[int, ...], layout: Layout, shuffle: str,
                 dims: list[str] | None, sharded: bool) -> None:
    """Create the array's metadata with zarr, then encode and write its chunks (or its one shard) directly.

    Same bytes zarr would write (C-order little-endian chunks, edge chunks padded with the fill value 0, all-fill
    chunks omitted, Blosc with the same parameters) without zarr's per-chunk async overhead (~1/3 of the write time
    of a BraTS case). Unsharded: plain `c.<i>.<j>...` files under the array folder (flat chunk key encoding).
    Sharded: one object `c.0.0...` holding every inner chunk and its index (`distseg.data.shards`), written even
    when every chunk is empty. The omitted chunks are listed in the array's `omitted_chunks` attribute, so the
    reader can tell them from lost files.
    """
    import numcodecs

    from distseg.data.shards import encode_shard, shard_shape

    grid = [-(-n // c) for n, c in zip(data.shape, chunks, strict=True)]
    boxes = {idx: tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, chunks, data.shape, strict=True))
             for idx in np.ndindex(*grid)}
    omitted = [list(idx) for idx, box in boxes.items() if not data[box].any()]
    shards = shard_shape(data.shape, chunks) if sharded else None
    group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shards,
                       compressors=_compressors(layout, shuffle), fill_value=0, dimension_names=dims,
                       chunk_key_encoding=CHUNK_KEY_ENCODING, attributes={OMITTED_CHUNKS: omitted})
    shuffle_id = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
                  "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[shuffle]
    codec = numcodecs.Blosc(cname=layout.cname, clevel=layout.clevel, shuffle=shuffle_id, blocksize=0)
    data = data.astype(data.dtype.newbyteorder("<"), copy=False)
    folder = Path(group.store.root) / group.path / name if group.path else Path(group.store.root) / name
    skip = {tuple(idx) for idx in omitted}
    encoded: list[bytes | None] = []
    for idx, box in boxes.items():  # C order: the order of a shard's index
        if idx in skip:  # all fill value: never written, like zarr's write_empty_chunks=False
            encoded.append(None)
            continue
        block = data[box]
        if block.shape != chunks:
            padded = np.zeros(chunks, dtype=data.dtype)
            padded[tuple(slice(0, n) for n in block.shape)] = block
            block = padded
        blob = codec.encode(np.ascontiguousarray(block))
        if sharded:
            encoded.append(blob)
        else:
            (folder / ("c." + ".".join(str(i) for i in idx))).write_bytes(blob)
    if sharded:
        (folder / ("c." + ".".join(["0"] * len(grid)))).write_bytes(encode_shard(encoded))


def _publish(store_path: Path, case_id: str, tmp: Path) -> None:
    """Rename a complete temp case into `cases/`; an older version is moved aside first, then deleted."""
    target = store_path / CASES_GROUP / case_id
    old = None
    if target.exists():
        old = store_path / TMP_DIR / f"{case_id}.old.{uuid.uuid4().hex}"
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_temp(store_path: Path | str) -> int:
    """Remove leftovers of killed runs under `.tmp/` and incomplete dirs under `cases/` (in a bucket: cases whose
    upload never finished); returns how many."""
    if is_remote(store_path):
        from preprocess import bucket

        return bucket.clean_partial(str(store_path))
    removed = 0
    tmp_root = store_path / TMP_DIR
    if tmp_root.is_dir():
        for entry in tmp_root.iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed += 1
    cases = store_path / CASES_GROUP
    if cases.is_dir():
        for entry in cases.iterdir():
            if entry.is_dir() and not (entry / "zarr.json").is_file():
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
    if removed:
        logger.info("removed %d leftover temporary entries from %s", removed, store_path)
    return removed


def retire_cases(store_path: Path | str, current: set[str]) -> tuple[list[str], str | None]:
    """Take the store's complete cases that this run did not write or find unchanged (their source is gone from
    --src, or failed to convert this time) out of the store: their stored fold and split are no longer this run's
    assignment, and training on a patient the user removed (or moved to another split) would leak. Each is moved,
    whole, to ``<name>.retired/<time>/<case>`` beside the store (nothing is deleted; in a bucket: copied there, then
    removed from the store, `preprocess.bucket.retire_cases`). Returns (case ids, where they went)."""
    import time

    stamp = time.strftime("%Y%m%dT%H%M%S")
    if is_remote(store_path):
        from preprocess import bucket

        stale = sorted(set(bucket.case_ids(str(store_path))) - current)
        if not stale:
            return [], None
        moved, dest_url = bucket.retire_cases(str(store_path), stale, stamp)
        if moved:
            logger.warning("%d cases of %s are not part of this run (no source under --src, or failed now) and were "
                           "moved out of the store to %s: %s", len(moved), store_path, dest_url,
                           ", ".join(moved[:10]) + (", ..." if len(moved) > 10 else ""))
        return moved, dest_url if moved else None
    cases = Path(store_path) / CASES_GROUP
    stale = sorted(d.name for d in cases.iterdir() if d.is_dir() and not d.name.startswith(".")
                   and (d / "zarr.json").is_file() and d.name not in current) if cases.is_dir() else []
    if not stale:
        return [], None
    dest = Path(store_path).with_suffix(".retired") / stamp
    dest.mkdir(parents=True, exist_ok=True)
    for cid in stale:
        os.replace(cases / cid, dest / cid)
    logger.warning("%d cases of %s are not part of this run (no source under --src, or failed now) and were moved "
                   "out of the store to %s: %s", len(stale), store_path, dest,
                   ", ".join(stale[:10]) + (", ..." if len(stale) > 10 else ""))
    return stale, str(dest)
