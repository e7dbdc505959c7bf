"""Stores on S3-compatible object storage (AWS S3, MinIO, Ceph RGW) through zarr's storage layer.

``s3://bucket/prefix`` opens a `zarr.storage.ObjectStore` over obstore's `S3Store` (the default; measured faster
than `FsspecStore` + s3fs in tests/benchmarks/bench_store_remote.py) or, with ``backend="fsspec"``, an
`FsspecStore` over s3fs (which also reads AWS profiles). Endpoint and credentials come from the standard variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``);
nothing secret is ever logged or put in an error message.

Reads are partial: a shard's index is one suffix-range GET, the chunks a patch needs one range GET per merged
span (`RemoteSource`), so a 4x128^3 patch costs <= 4 GETs (2 once the indexes are cached).

Writes of command outputs (`--output s3://...` of predict and evaluate) go to a local staging folder first and are
uploaded file by file (`UploadedFolder`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from distseg.data.layout import StoreError

logger = logging.getLogger(__name__)

DEFAULT_BACKEND = "obstore"
COALESCE_GAP = 1 << 20
"""Byte ranges of one object closer than this are fetched in one GET (a request costs ~ a MiB of transfer)."""


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b")."""
    if not url.startswith("s3://"):
        raise ValueError(f"{url}: not an s3:// URL")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{url}: no bucket name (expected s3://bucket/prefix)")
    return bucket, prefix.strip("/")


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def open_zarr_store(url: str, read_only: bool = True, backend: str = DEFAULT_BACKEND) -> Any:
    """A zarr `Store` rooted at ``s3://bucket/prefix`` (`backend`: "obstore" or "fsspec")."""
    bucket, prefix = split_url(url)
    endpoint = _endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    if backend == "obstore":
        from obstore.store import S3Store
        from zarr.storage import ObjectStore

        config: dict[str, Any] = {"region": region}
        if endpoint:
            config.update(endpoint=endpoint, allow_http=endpoint.startswith("http://"),
                          virtual_hosted_style_request=False)
        s3 = S3Store(bucket, prefix=prefix or None, config=config)  # credentials: obstore's standard chain
        return ObjectStore(s3, read_only=read_only)
    if backend == "fsspec":
        import s3fs
        from zarr.storage import FsspecStore

        fs = s3fs.S3FileSystem(asynchronous=True, endpoint_url=endpoint, client_kwargs={"region_name": region})
        return FsspecStore(fs, path=f"{bucket}/{prefix}".rstrip("/"), read_only=read_only)
    raise ValueError(f"unknown object-store backend {backend!r}; expected 'obstore' or 'fsspec'")


def _sync(coro: Any) -> Any:
    from zarr.core.sync import sync

    return sync(coro)


def describe_error(url: str, e: BaseException) -> str:
    """A clear one-line reason for a failed request (no credentials in it: the SDKs never put secrets in errors)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    low = str(e).lower()
    if "nosuchbucket" in low or "bucket does not exist" in low or "no such bucket" in low:
        return f"{url}: the bucket does not exist ({text})"
    if any(k in low for k in ("invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "403", "forbidden",
                              "credential")):
        return f"{url}: access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE ({text})"
    return f"{url}: {text}"


class RemoteSource:
    """`distseg.data.shards.ByteSource` over objects under one key prefix of a zarr store."""

    coalesce_gap = COALESCE_GAP

    def __init__(self, store: Any, url: str, prefix: str) -> None:
        self.store, self.url, self.prefix = store, url, prefix.strip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def describe(self, key: str) -> str:
        return f"{self.url}/{self._key(key)}".rstrip("/")

    async def _get(self, key: str, byte_range: Any) -> bytes:
        from zarr.core.buffer import default_buffer_prototype

        buf = await self.store.get(self._key(key), default_buffer_prototype(), byte_range=byte_range)
        if buf is None:
            raise FileNotFoundError(self.describe(key))
        return buf.to_bytes()

    def close(self) -> None:
        """Nothing to release: requests hold no open object between calls."""

    def get_suffix(self, key: str, n: int) -> bytes:
        from zarr.abc.store import SuffixByteRequest

        try:
            return _sync(self._get(key, SuffixByteRequest(n)))
        except FileNotFoundError:
            raise
        except Exception as e:
            raise StoreError(describe_error(self.describe(key), e)) from None

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        from zarr.abc.store import RangeByteRequest

        async def fetch_all() -> list[bytes]:
            return list(await asyncio.gather(*(self._get(key, RangeByteRequest(s, s + n)) for s, n in ranges)))

        try:
            return _sync(fetch_all())
        except FileNotFoundError:
            raise
        except Exception as e:
            raise StoreError(describe_error(self.describe(key), e)) from None


class RemoteLocation:
    """A store under ``s3://bucket/prefix`` (see the module docstring). The zarr store (obstore's client, an async
    runtime) is made per process: a location inherited through fork or pickled into a worker opens its own."""

    def __init__(self, url: str, backend: str = DEFAULT_BACKEND) -> None:
        self.url = url.rstrip("/")
        self.backend = backend
        self._store: Any = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "backend": self.backend, "_store": None, "_pid": -1}

    @property
    def store(self) -> Any:
        if self._store is None or self._pid != os.getpid():
            self._store = open_zarr_store(self.url, read_only=True, backend=self.backend)
            self._pid = os.getpid()
        return self._store

    def check_access(self) -> None:
        """Raise StoreError saying why when the bucket is missing or refuses these credentials (one LIST)."""

        async def first() -> None:
            async for _ in self.store.list_prefix(""):
                break

        try:
            _sync(first())
        except Exception as e:
            raise StoreError(describe_error(self.url, e)) from None

    def read_json(self, key: str) -> dict[str, Any]:
        from zarr.core.buffer import default_buffer_prototype

        try:
            buf = _sync(self.store.get(key, default_buffer_prototype()))
        except Exception as e:
            raise StoreError(describe_error(f"{self.url}/{key}", e)) from None
        if buf is None:
            raise FileNotFoundError(f"{self.url}/{key}")
        return json.loads(buf.to_bytes())

    def exists(self, key: str) -> bool:
        try:
            return bool(_sync(self.store.exists(key)))
        except Exception as e:
            raise StoreError(describe_error(f"{self.url}/{key}", e)) from None

    def list_dir(self, key: str) -> list[str]:
        async def collect() -> list[str]:
            return [name async for name in self.store.list_dir(key.strip("/"))]

        try:
            return _sync(collect())
        except Exception as e:
            raise StoreError(describe_error(f"{self.url}/{key}", e)) from None

    def source(self, key: str) -> RemoteSource:
        return RemoteSource(self.store, self.url, key)


class RemoteWriteError(OSError):
    """An upload to object storage failed (the message names the URL and why; the local copy stays)."""


def cache_base() -> Path:
    """distseg's local cache: ``$DISTSEG_CACHE`` (default ``~/.cache/distseg``)."""
    return Path(os.environ.get("DISTSEG_CACHE") or Path.home() / ".cache" / "distseg").expanduser()


def url_folder(root: Path, url: str) -> Path:
    """The folder under `root` mirroring `url` (``s3://b/p/q`` -> ``root/b/p/q``); ValueError for '.', '..' or a
    backslash in the URL, which could lead outside `root`."""
    bucket, prefix = split_url(url)
    parts = [bucket, *[p for p in prefix.split("/") if p]]
    if any(p in (".", "..") or "\\" in p for p in parts):
        raise ValueError(f"{url}: '.' and '..' are not allowed in an s3:// path")
    return root.joinpath(*parts)


def staging_dir(url: str) -> Path:
    """The local folder where outputs bound for `url` are written before upload: ``<cache>/outputs/<bucket>/<prefix>``
    (`cache_base`)."""
    return url_folder(cache_base() / "outputs", url)


class UploadedFolder:
    """An output folder bound for ``s3://bucket/prefix``: commands write into `local` as on POSIX (complete files
    only: `atomic_write` renames hidden temporaries into place), and `sync` puts each new or changed file under the
    same relative key. An object PUT is atomic, so a reader of the bucket never sees half a file; what was written
    stays in `local` whatever the bucket does."""

    def __init__(self, url: str, local: Path | None = None) -> None:
        self.url = url.rstrip("/")
        self.local = staging_dir(self.url) if local is None else Path(local)
        self._sent: dict[str, tuple[int, int]] = {}
        self._s3: Any = None

    def sync(self, files: Iterable[Path] | None = None) -> int:
        """Upload the files of `local` not yet uploaded in their current version (only `files` when given: paths
        under `local`); returns how many. Raises RemoteWriteError naming the URL."""
        import obstore

        n = 0
        try:
            if self._s3 is None:
                self._s3 = open_zarr_store(self.url, read_only=False, backend="obstore").store
            for p in sorted(self.local.rglob("*") if files is None else files):
                rel = p.relative_to(self.local).as_posix()
                if not p.is_file() or any(part.startswith(".") for part in rel.split("/")):
                    continue
                st = p.stat()
                if self._sent.get(rel) == (st.st_size, st.st_mtime_ns):
                    continue
                obstore.put(self._s3, rel, p)
                self._sent[rel] = (st.st_size, st.st_mtime_ns)
                n += 1
        except OSError as e:
            if isinstance(e, RemoteWriteError):
                raise
            raise RemoteWriteError(describe_error(self.url, e)) from e
        except Exception as e:  # obstore's errors for a missing bucket, refused credentials, a dead endpoint
            raise RemoteWriteError(describe_error(self.url, e)) from e
        return n
