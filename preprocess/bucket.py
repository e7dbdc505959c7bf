"""The writer side of the store contract on S3-compatible object storage (``--dst s3://bucket/prefix``).

Objects cannot be renamed, so a case becomes visible the other way round from POSIX: it is converted into a local
temporary folder (the same code as on POSIX), then its objects are uploaded with the case group's ``zarr.json``
LAST. Readers count a case only once that object exists (`distseg.data.store`), so a half-uploaded case is never
read; `clean_partial` removes such leftovers at the start of the next run, and the case is redone. Replacing a case
deletes its old ``zarr.json`` first (the case disappears), then its other objects, then uploads the new one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from distseg.data.layout import CASES_GROUP, FORMAT_VERSION, INDEX_FILE, PREVIOUS_INDEX, StoreError
from distseg.data.remote import _sync, describe_error, open_zarr_store

logger = logging.getLogger(__name__)

UPLOAD_CONCURRENCY = 16


class Bucket:
    """A store URL ``s3://bucket/prefix/<name>.zarr`` opened for writing through zarr's storage layer."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.store = open_zarr_store(self.url, read_only=False)

    def _call(self, coro: Any, what: str) -> Any:
        try:
            return _sync(coro)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise StoreError(describe_error(f"{self.url}/{what}", e)) from None

    def get(self, key: str) -> bytes | None:
        from zarr.core.buffer import default_buffer_prototype

        buf = self._call(self.store.get(key, default_buffer_prototype()), key)
        return None if buf is None else buf.to_bytes()

    def put(self, key: str, data: bytes) -> None:
        from zarr.core.buffer import default_buffer_prototype

        self._call(self.store.set(key, default_buffer_prototype().buffer.from_bytes(data)), key)

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        """Upload objects concurrently (bounded); returns when all are stored."""
        from zarr.core.buffer import default_buffer_prototype

        proto = default_buffer_prototype()
        limit = asyncio.Semaphore(UPLOAD_CONCURRENCY) if items else None

        async def one(key: str, data: bytes) -> None:
            async with limit:
                await self.store.set(key, proto.buffer.from_bytes(data))

        async def run() -> None:
            await asyncio.gather(*(one(k, d) for k, d in items))

        self._call(run(), items[0][0] if items else "")

    def delete_prefix(self, prefix: str) -> None:
        self._call(self.store.delete_dir(prefix.rstrip("/")), prefix)

    def delete(self, key: str) -> None:
        self._call(self.store.delete(key), key)

    def list_dir(self, key: str) -> list[str]:
        async def collect() -> list[str]:
            return [name async for name in self.store.list_dir(key.strip("/"))]

        return self._call(collect(), key)

    def list_prefix(self, prefix: str) -> list[str]:
        """Every key under `prefix` (recursively)."""
        async def collect() -> list[str]:
            return [key async for key in self.store.list_prefix(prefix)]

        return self._call(collect(), prefix)

    def read_json(self, key: str) -> dict[str, Any] | None:
        raw = self.get(key)
        return None if raw is None else json.loads(raw)

    def check_access(self) -> None:
        async def first() -> None:
            async for _ in self.store.list_prefix(""):
                break

        self._call(first(), "")


def init_store(url: str, root_attrs: dict[str, Any], compatible: Any) -> None:
    """Create the root group (or check an existing one with `compatible(attrs)`), like the POSIX writer."""
    bucket = Bucket(url)
    bucket.check_access()
    doc = bucket.read_json("zarr.json")
    if doc is not None:
        compatible(doc.get("attributes", {}))
        doc["attributes"] = {**doc.get("attributes", {}), **root_attrs}
    else:
        doc = {"zarr_format": 3, "node_type": "group", "attributes": root_attrs}
    bucket.put("zarr.json", json.dumps(doc, indent=2).encode())
    if bucket.get(f"{CASES_GROUP}/zarr.json") is None:
        bucket.put(f"{CASES_GROUP}/zarr.json", json.dumps({"zarr_format": 3, "node_type": "group",
                                                           "attributes": {}}).encode())


def upload_case(url: str, case_id: str, folder: Path) -> None:
    """Publish a complete case written locally in `folder`: arrays first, the case's ``zarr.json`` last."""
    bucket = Bucket(url)
    prefix = f"{CASES_GROUP}/{case_id}"
    if bucket.get(f"{prefix}/zarr.json") is not None:  # replacing: hide the old case before touching it
        bucket.delete(f"{prefix}/zarr.json")
        bucket.delete_prefix(prefix)
    items = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root, name)
            rel = path.relative_to(folder).as_posix()
            if rel != "zarr.json":
                items.append((f"{prefix}/{rel}", path.read_bytes()))
    bucket.put_many(items)
    bucket.put(f"{prefix}/zarr.json", (folder / "zarr.json").read_bytes())


def retire_cases(url: str, stale: list[str], stamp: str) -> tuple[list[str], str]:
    """Move complete cases out of the store to ``<name>.retired/<stamp>/<case>/`` beside it, as the POSIX writer
    does (`preprocess.writer.retire_cases`); returns (the cases moved, that prefix's URL).

    Objects cannot be renamed, so each case is copied first (its ``zarr.json`` last), and only then taken out of
    the store: its ``zarr.json`` first (readers stop listing it), then its other objects. A run killed half-way
    leaves the case either still in the store (retired again by the next run) or hidden and half-deleted (removed
    as a half-uploaded case by the next run's `clean_partial`), never without its complete copy. A case the bucket
    refuses to move is logged and stays; the others are still moved."""
    src = Bucket(url)
    dest_url = f"{url.rstrip('/').removesuffix('.zarr')}.retired/{stamp}"
    dest = Bucket(dest_url)
    moved = []
    for cid in stale:
        prefix = f"{CASES_GROUP}/{cid}/"
        try:
            meta = src.get(f"{prefix}zarr.json")
            if meta is None:  # not a complete case (any more): nothing to keep
                continue
            items = []
            for key in src.list_prefix(prefix):
                data = None if key == f"{prefix}zarr.json" else src.get(key)
                if data is not None:
                    items.append((f"{cid}/{key[len(prefix):]}", data))
            dest.put_many(items)
            dest.put(f"{cid}/zarr.json", meta)
        except (StoreError, OSError) as e:
            logger.error("%s: could not copy case %r to %s (%s); it stays in the store", url, cid, dest_url, e)
            continue
        try:
            src.delete(f"{prefix}zarr.json")
            src.delete_prefix(prefix)
        except (StoreError, OSError) as e:
            logger.error("%s: case %r was copied to %s but could not be removed from the store (%s); the next run "
                         "retires it again", url, cid, dest_url, e)
            continue
        moved.append(cid)
    return moved, dest_url


def read_case_doc(url: str, case_id: str) -> dict[str, Any] | None:
    try:
        return Bucket(url).read_json(f"{CASES_GROUP}/{case_id}/zarr.json")
    except ValueError:
        return None


def add_consolidated(url: str, case_id: str) -> None:
    """`preprocess.writer.add_consolidated` in a bucket: one PUT of the case's ``zarr.json`` (atomic)."""
    from preprocess.writer import consolidated_doc

    bucket = Bucket(url)
    prefix = f"{CASES_GROUP}/{case_id}"
    doc = bucket.read_json(f"{prefix}/zarr.json")
    if doc is None:
        raise StoreError(f"{url}: case {case_id!r} vanished while its metadata was consolidated")
    arrays = {}
    for name in sorted(bucket.list_dir(prefix)):
        meta = None if name == "zarr.json" else bucket.read_json(f"{prefix}/{name}/zarr.json")
        if meta is not None:
            arrays[name] = meta
    bucket.put(f"{prefix}/zarr.json", json.dumps(consolidated_doc(doc, arrays), indent=2).encode())


def update_case_attrs(url: str, case_id: str, updates: dict[str, Any]) -> None:
    """One PUT of the case's ``zarr.json`` (an object PUT is atomic)."""
    bucket = Bucket(url)
    key = f"{CASES_GROUP}/{case_id}/zarr.json"
    doc = bucket.read_json(key)
    if doc is None:
        raise StoreError(f"{url}: case {case_id!r} vanished while its attributes were updated")
    doc.setdefault("attributes", {}).update(updates)
    bucket.put(key, json.dumps(doc, indent=2).encode())


def clean_partial(url: str) -> int:
    """Delete cases whose upload never finished (objects but no ``zarr.json``); returns how many."""
    bucket = Bucket(url)
    removed = 0
    for name in bucket.list_dir(CASES_GROUP):
        if name != "zarr.json" and bucket.get(f"{CASES_GROUP}/{name}/zarr.json") is None:
            bucket.delete_prefix(f"{CASES_GROUP}/{name}")
            removed += 1
    if removed:
        logger.info("removed %d half-uploaded cases from %s", removed, url)
    return removed


def case_ids(url: str) -> list[str]:
    """The case prefixes in the bucket's store: one listing, no request per case (half-uploaded ones were removed
    by `clean_partial` when the run started)."""
    return sorted(n for n in Bucket(url).list_dir(CASES_GROUP) if n != "zarr.json")


def remove_index(url: str) -> None:
    bucket = Bucket(url)
    raw = bucket.get(INDEX_FILE)
    if raw is not None:
        bucket.put(PREVIOUS_INDEX, raw)
        bucket.delete(INDEX_FILE)


def write_index(url: str) -> int:
    bucket = Bucket(url)
    cases = {}
    for cid in sorted(bucket.list_dir(CASES_GROUP)):
        if cid == "zarr.json":
            continue
        doc = bucket.read_json(f"{CASES_GROUP}/{cid}/zarr.json")
        if doc is not None:
            cases[cid] = doc.get("attributes", {})
    data = json.dumps({"format_version": FORMAT_VERSION, "cases": cases}, separators=(",", ":")).encode("utf-8")
    bucket.put(INDEX_FILE, data)
    if bucket.get(PREVIOUS_INDEX) is not None:
        bucket.delete(PREVIOUS_INDEX)
    return len(cases)


def put_file(url: str, data: bytes) -> None:
    """Upload one object given by its full URL (the manifest beside the store)."""
    parent, _, name = url.rstrip("/").rpartition("/")
    Bucket(parent).put(name, data)
