"""Zarr v3 sharded arrays (`sharding_indexed` codec), written and read directly.

A shard is one object holding many inner chunks: the encoded chunks one after another, then the shard index at
the end: for each inner chunk in C order, (offset, nbytes) as little-endian uint64 (2**64-1 twice: never written,
all fill value), followed by the CRC32C of those index bytes (4 bytes, little-endian). The writer makes the whole
array one shard (`shard_shape`), so a case is one object per array; a patch read fetches the index once per open
array and then only the byte ranges of the inner chunks it needs (adjacent ranges merged: `ByteSource`).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from distseg.data.chunks import GridReader, codecs_supported, make_decoder
from distseg.data.layout import StoreError

EMPTY = 2**64 - 1
"""Offset and length of an inner chunk that was never written (all fill value)."""
CRC_BYTES = 4


def shard_shape(shape: Sequence[int], inner: Sequence[int]) -> tuple[int, ...]:
    """The smallest multiple of the inner chunk shape that covers `shape`: the whole array in one shard."""
    return tuple(-(-int(n) // int(c)) * int(c) for n, c in zip(shape, inner, strict=True))


def encode_shard(chunks: Sequence[bytes | None]) -> bytes:
    """One shard object from its encoded inner chunks in C order (None: never written)."""
    import google_crc32c

    index = np.full((len(chunks), 2), EMPTY, dtype="<u8")
    parts, offset = [], 0
    for i, blob in enumerate(chunks):
        if blob is not None:
            index[i] = (offset, len(blob))
            parts.append(blob)
            offset += len(blob)
    raw = index.tobytes()
    return b"".join(parts) + raw + np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes()


class ByteSource(Protocol):
    """Where an array's objects live: a folder (`LocalFiles`) or an object store (`distseg.data.remote`)."""

    coalesce_gap: int
    """Byte ranges closer than this are fetched as one (a request costs more than reading the gap)."""

    def get_suffix(self, key: str, n: int) -> bytes:
        """The last `n` bytes of object `key`; FileNotFoundError when it does not exist."""

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (start, length) of object `key`, in one open or as few requests as possible."""

    def close(self) -> None:
        """Release what the source holds open (a file descriptor); later reads reopen."""

    def describe(self, key: str) -> str:
        """A human-readable location of `key`, for error messages."""


class LocalFiles:
    """A folder on a POSIX file system, read with `os.pread`. The file read last stays open (one descriptor per
    source, closed by `close()`, by reading another file, or when the source is garbage-collected): a sharded array
    is one file, so after its first read (index and data through the same open) a patch opens nothing. On a shared
    file system (Lustre, NFS) opens are what load the metadata server; reads are not."""

    coalesce_gap = 0

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._key: str | None = None
        self._fd: int | None = None
        self._closer: weakref.finalize | None = None

    def _open(self, key: str) -> int:
        if key != self._key or self._fd is None:
            self.close()
            fd = os.open(self.root / key, os.O_RDONLY)  # not inherited by exec'd children (PEP 446)
            self._key, self._fd = key, fd
            self._closer = weakref.finalize(self, os.close, fd)
        return self._fd

    def close(self) -> None:
        """Close the open file, if any (reads reopen it)."""
        if self._closer is not None:
            self._closer()
        self._key, self._fd, self._closer = None, None, None

    def get_suffix(self, key: str, n: int) -> bytes:
        fd = self._open(key)
        size = os.fstat(fd).st_size
        return os.pread(fd, min(n, size), max(size - n, 0))

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        fd = self._open(key)
        return [os.pread(fd, length, start) for start, length in ranges]

    def describe(self, key: str) -> str:
        return str(self.root / key)


def merge_ranges(spans: Sequence[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """(start, length) spans sorted and merged where they touch or lie at most `gap` bytes apart."""
    merged: list[list[int]] = []
    for start, length in sorted(spans):
        if merged and start <= merged[-1][0] + merged[-1][1] + gap:
            merged[-1][1] = max(merged[-1][1], start + length - merged[-1][0])
        else:
            merged.append([start, length])
    return [(s, n) for s, n in merged]


class ShardReader(GridReader):
    """Reads inner chunks of a sharded array (index at the end) through a `ByteSource`, decoding with numcodecs in
    the calling thread. Each shard's index is read once per reader (the store keeps readers open, bounded)."""

    def __init__(self, source: ByteSource, meta: dict[str, Any], what: str = "") -> None:
        conf = meta["codecs"][0]["configuration"]
        super().__init__(source.describe(""), meta, conf["chunk_shape"], make_decoder(conf["codecs"][1]), what)
        self.source = source
        self.shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.per_shard = tuple(s // c for s, c in zip(self.shard, self.chunks, strict=True))
        self.checksum = any(c.get("name") == "crc32c" for c in conf.get("index_codecs", []))
        enc = meta["chunk_key_encoding"]
        sep = enc.get("configuration", {}).get("separator", "/")
        self.prefix, self.sep = "c" + sep, sep
        self._indexes: dict[tuple[int, ...], np.ndarray | None] = {}

    @staticmethod
    def supports(meta: dict[str, Any]) -> bool:
        codecs = meta.get("codecs", [])
        if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            return False
        conf = codecs[0].get("configuration", {})
        index_codecs = [c.get("name") for c in conf.get("index_codecs", [])]
        return (
            meta.get("chunk_grid", {}).get("name") == "regular"
            and meta.get("chunk_key_encoding", {}).get("name") == "default"
            and codecs_supported(conf.get("codecs", []))
            and conf.get("index_location", "end") == "end"
            and index_codecs in (["bytes"], ["bytes", "crc32c"])
            and conf["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
            and not meta.get("storage_transformers")
        )

    def close(self) -> None:
        """Release the source's open file (POSIX); the cached shard indexes stay valid."""
        self.source.close()

    def _key(self, sidx: tuple[int, ...]) -> str:
        return self.prefix + self.sep.join(str(i) for i in sidx)

    def _index(self, sidx: tuple[int, ...]) -> np.ndarray | None:
        """(n_inner, 2) uint64 offsets and lengths of shard `sidx`, None when the shard was never written."""
        if sidx in self._indexes:
            return self._indexes[sidx]
        n = int(np.prod(self.per_shard))
        size = 16 * n + (CRC_BYTES if self.checksum else 0)
        key = self._key(sidx)
        try:
            raw = self.source.get_suffix(key, size)
        except FileNotFoundError:
            if self.omitted is not None:  # this writer writes every shard, even an all-empty one
                raise StoreError(f"{self.what}: shard {self.source.describe(key)} is missing but the writer wrote "
                                 "it (truncated or damaged store); re-run `python -m preprocess ... --force` for "
                                 "this case") from None
            self._indexes[sidx] = None
            return None
        if len(raw) != size:
            raise StoreError(f"{self.what}: shard {self.source.describe(key)} is {len(raw)} bytes, shorter than its "
                             f"{size}-byte index (truncated store)")
        if self.checksum:
            import google_crc32c

            if np.uint32(google_crc32c.value(raw[:-CRC_BYTES])).astype("<u4").tobytes() != raw[-CRC_BYTES:]:
                raise StoreError(f"{self.what}: shard {self.source.describe(key)} has a corrupt index (CRC32C "
                                 "mismatch); re-run `python -m preprocess ... --force` for this case")
        index = np.frombuffer(raw[: 16 * n], dtype="<u8").reshape(n, 2)
        self._indexes[sidx] = index
        return index

    def fetch(self, indices: list[tuple[int, ...]]) -> dict[tuple[int, ...], Any]:
        out: dict[tuple[int, ...], Any] = {}
        by_shard: dict[tuple[int, ...], list[tuple[tuple[int, ...], int, int]]] = {}
        for cidx in indices:
            sidx = tuple(c // p for c, p in zip(cidx, self.per_shard, strict=True))
            index = self._index(sidx)
            local = tuple(c % p for c, p in zip(cidx, self.per_shard, strict=True))
            offset, length = (EMPTY, EMPTY) if index is None else index[np.ravel_multi_index(local, self.per_shard)]
            if offset == EMPTY:
                out[cidx] = None
            else:
                by_shard.setdefault(sidx, []).append((cidx, int(offset), int(length)))
        for sidx, wanted in by_shard.items():
            spans = merge_ranges([(o, n) for _, o, n in wanted], self.source.coalesce_gap)
            blobs = self.source.get_ranges(self._key(sidx), spans)
            for cidx, offset, length in wanted:
                for (start, n), blob in zip(spans, blobs, strict=True):
                    if start <= offset and offset + length <= start + n:
                        out[cidx] = memoryview(blob)[offset - start : offset - start + length]
                        break
                if len(out.get(cidx) or b"") != length:
                    raise StoreError(f"{self.what}: shard {self.source.describe(self._key(sidx))} ends before "
                                     f"chunk {cidx} (truncated store)")
        return out
