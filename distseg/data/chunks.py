"""A direct chunk reader for the arrays this project writes (see `ChunkReader`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from distseg.data.layout import OMITTED_CHUNKS, StoreError


class ChunkReader:
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
