"""Direct readers for the arrays this project writes: one file per chunk (`ChunkReader`) or one sharded object
per array (`distseg.data.shards.ShardReader`). Both share the slicing here (`GridReader`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distseg.data.layout import OMITTED_CHUNKS, StoreError

_BLOSC_OR_ZSTD = ("blosc", "zstd")


def codecs_supported(codecs: Sequence[dict[str, Any]]) -> bool:
    """[bytes (little-endian), blosc | zstd]: what the writer uses for chunks (and inner chunks of shards)."""
    return (
        len(codecs) == 2
        and codecs[0].get("name") == "bytes"
        and codecs[0].get("configuration", {}).get("endian", "little") == "little"
        and codecs[1].get("name") in _BLOSC_OR_ZSTD
    )


def make_decoder(codec: dict[str, Any]) -> Any:
    """The numcodecs decode function of a zarr v3 blosc or zstd codec entry (both self-describing)."""
    import numcodecs

    return numcodecs.Blosc().decode if codec["name"] == "blosc" else numcodecs.Zstd().decode


class GridReader:
    """Slicing over a regular grid of equally shaped, separately encoded chunks. Subclasses say where a chunk's
    bytes are (`fetch`); decoding (numcodecs, in the calling thread) and placement are shared.

    `chunks`: the chunk shape (inner chunks for sharded arrays); `dtype`: little-endian element type."""

    def __init__(self, path: Path | str, meta: dict[str, Any], chunks: Sequence[int], decode: Any,
                 what: str = "") -> None:
        self.path = path
        self.what = what or str(path)  # "case 'X' array 'image'", for error messages
        omitted = meta.get("attributes", {}).get(OMITTED_CHUNKS)
        self.omitted = None if omitted is None else {tuple(int(i) for i in idx) for idx in omitted}
        self.shape = tuple(meta["shape"])
        self.chunks = tuple(int(c) for c in chunks)
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.fill = meta.get("fill_value", 0)
        self.decode = decode

    def fetch(self, indices: list[tuple[int, ...]]) -> dict[tuple[int, ...], bytes | None]:
        """Encoded bytes of each chunk (global chunk index), None for a chunk never written (all fill value)."""
        raise NotImplementedError

    def __getitem__(self, sel: Any) -> np.ndarray:
        sel = () if sel is Ellipsis else sel if isinstance(sel, tuple) else (sel,)
        if not all(isinstance(s, slice) and s.step in (None, 1) for s in sel):
            raise StoreError(f"{self.path}: only contiguous slices are supported, got {sel!r}")
        sel = sel + (slice(None),) * (len(self.shape) - len(sel))
        box = [s.indices(n)[:2] for s, n in zip(sel, self.shape, strict=True)]
        out = np.empty(tuple(hi - lo for lo, hi in box), dtype=self.dtype)
        ranges = [range(lo // c, (hi - 1) // c + 1) if hi > lo else range(0) for (lo, hi), c in
                  zip(box, self.chunks, strict=True)]
        indices = [tuple(r[i] for r, i in zip(ranges, idx, strict=True))
                   for idx in np.ndindex(*[len(r) for r in ranges])]
        blobs = self.fetch(indices) if indices else {}
        for cidx in indices:
            src, dst = [], []
            for (lo, hi), c, ci in zip(box, self.chunks, cidx, strict=True):
                a, b = max(lo, ci * c), min(hi, (ci + 1) * c)
                src.append(slice(a - ci * c, b - ci * c))
                dst.append(slice(a - lo, b - lo))
            blob = blobs[cidx]
            if blob is None:
                out[tuple(dst)] = self.fill
                continue
            chunk = np.frombuffer(self.decode(blob), dtype=self.dtype).reshape(self.chunks)
            out[tuple(dst)] = chunk[tuple(src)]
        return out


class ChunkReader(GridReader):
    """Direct reader for arrays stored one file per chunk (regular grid, little-endian bytes, one Blosc or Zstd
    codec), as the writer did before sharding. It decodes chunk files with numcodecs in the calling thread, skipping
    zarr's async machinery, which costs ~1/3 of a 4x128^3 patch read (see .notes/preprocess.md); anything else
    goes through zarr."""

    def __init__(self, path: Path, meta: dict[str, Any], what: str = "") -> None:
        super().__init__(path, meta, meta["chunk_grid"]["configuration"]["chunk_shape"],
                         make_decoder(meta["codecs"][1]), what)
        enc = meta["chunk_key_encoding"]
        sep = enc.get("configuration", {}).get("separator", "/")
        self.prefix = "c" + sep if enc["name"] == "default" else ""
        self.sep = sep

    @staticmethod
    def supports(meta: dict[str, Any]) -> bool:
        return (
            meta.get("chunk_grid", {}).get("name") == "regular"
            and meta.get("chunk_key_encoding", {}).get("name") == "default"
            and codecs_supported(meta.get("codecs", []))
            and not meta.get("storage_transformers")
        )

    def fetch(self, indices: list[tuple[int, ...]]) -> dict[tuple[int, ...], bytes | None]:
        out: dict[tuple[int, ...], bytes | None] = {}
        for cidx in indices:
            key = self.prefix + self.sep.join(str(i) for i in cidx)
            try:
                out[cidx] = (self.path / key).read_bytes()
            except FileNotFoundError:
                if self.omitted is not None and cidx not in self.omitted:
                    raise StoreError(
                        f"{self.what}: chunk file {self.path / key} is missing but the writer wrote it (truncated or "
                        "damaged store); re-run `python -m preprocess ... --force` for this case"
                    ) from None
                out[cidx] = None  # never written because it was all fill value (or an older writer)
        return out
