"""Checkpoints in an S3-compatible bucket, the bucket side of `distseg.core.checkpoint`'s rules: the same tag names,
the same ``COMPLETE.json`` marker (put last, listing every file with its size), the same three states and the same
pruning rule. Every function takes an obstore ``S3Store`` rooted at the run's URL (``s3://bucket/prefix/runs/NAME``;
`distseg.data.remote.open_zarr_store(url).store` makes one), so this module needs no storage set-up of its own.

Used by the training mirror (`distseg.train.mirror`: upload, resume, prune) and by model loading from a bucket
(`distseg.inference.remote`: the best complete tag of a run, downloaded).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from distseg.core import checkpoint
from distseg.core.checkpoint import MARKER, TAG_PREFIX

logger = logging.getLogger(__name__)


def remote_tags(s3: Any) -> list[checkpoint.TagStatus]:
    """Every tag under ``checkpoints/`` with what reading its marker found (the POSIX states), oldest first."""
    import obstore

    listing = obstore.list_with_delimiter(s3, "checkpoints/")
    out = []
    for prefix in listing["common_prefixes"]:
        name = prefix.rstrip("/").rsplit("/", 1)[-1]
        if not (name.startswith(TAG_PREFIX) and name.removeprefix(TAG_PREFIX).isdigit()):
            continue
        step = int(name.removeprefix(TAG_PREFIX))
        try:
            marker = json.loads(bytes(obstore.get(s3, f"checkpoints/{name}/{MARKER}").bytes()))
        except FileNotFoundError:
            out.append(checkpoint.TagStatus(name, step, checkpoint.INCOMPLETE, reason=f"no {MARKER}"))
            continue
        except ValueError as e:
            out.append(checkpoint.TagStatus(name, step, checkpoint.INCOMPLETE, reason=f"malformed {MARKER} ({e})"))
            continue
        except Exception as e:  # throttling, 5xx, access: no evidence either way
            out.append(checkpoint.TagStatus(name, step, checkpoint.UNREADABLE, reason=str(e).splitlines()[0]))
            continue
        state = checkpoint.COMPLETE if int(marker.get("step", -1)) == step else checkpoint.INCOMPLETE
        out.append(checkpoint.TagStatus(name, step, state, marker))
    return sorted(out, key=lambda t: t.step)


def complete_remote(s3: Any) -> list[tuple[int, str, dict[str, Any]]]:
    """(step, tag, marker) of every complete tag in the bucket, oldest first (as `checkpoint.complete_checkpoints`)."""
    return [(t.step, t.tag, t.marker or {}) for t in remote_tags(s3) if t.state == checkpoint.COMPLETE]


def newest_complete_remote(s3: Any) -> str | None:
    complete = complete_remote(s3)
    return complete[-1][1] if complete else None


def download_tag(s3: Any, key: str, dest: Path) -> dict[str, Any]:
    """Download the complete tag at `key` (``checkpoints/step_...``, or "" when `s3` is rooted at the tag) into the
    folder `dest`: every file its marker lists, then the marker itself, into a temporary sibling of this process's
    own renamed into place (an interrupted download never looks complete; nodes that share a staging folder and
    download the same tag at once each leave a complete copy). Returns the marker."""
    import obstore

    prefix = f"{key.strip('/')}/" if key.strip("/") else ""
    marker = json.loads(bytes(obstore.get(s3, f"{prefix}{MARKER}").bytes()))
    tmp = dest.with_name(f".{dest.name}.download.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for name in marker["files"]:
            if Path(name).name != name:  # a marker names files of its own tag only
                raise checkpoint.CheckpointError(f"{prefix}{MARKER}: lists {name!r}; expected plain file names")
            with open(tmp / name, "wb") as f:
                for part in obstore.get(s3, f"{prefix}{name}").stream():
                    f.write(part)
        (tmp / MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _install(tmp, dest)
    return marker


def _install(tmp: Path, dest: Path, attempts: int = 3) -> None:
    """Move the complete download `tmp` to `dest` without ever deleting a complete copy in place there.

    Nodes sharing a staging folder may install the same tag at once, and all their copies are identical. A
    complete `dest` is kept (ours is discarded); an incomplete leftover (an older interrupted download) is first
    renamed aside atomically, then deleted, so no process removes files from a folder another one just installed
    (the old way, delete `dest` then rename, could delete a peer's fresh copy and fail with "Directory not empty":
    found by tests/train/test_mirror_files.py)."""
    for _ in range(attempts):
        if checkpoint.inspect_tag(dest).state == checkpoint.COMPLETE:  # a peer's complete copy: keep it
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if dest.exists():
            aside = dest.with_name(f".{dest.name}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}")
            try:
                dest.rename(aside)
            except FileNotFoundError:  # a peer moved it aside already
                pass
            else:
                if checkpoint.inspect_tag(aside).state == checkpoint.COMPLETE:  # it was completed meanwhile
                    try:
                        aside.rename(dest)
                    except OSError:
                        pass
                    else:
                        shutil.rmtree(tmp, ignore_errors=True)
                        return
                shutil.rmtree(aside, ignore_errors=True)
        try:
            tmp.rename(dest)
            return
        except OSError:  # a peer's copy landed in between (ENOTEMPTY / EEXIST): look at it again
            continue
    shutil.rmtree(tmp, ignore_errors=True)
    raise checkpoint.CheckpointError(f"{dest}: could not install the downloaded checkpoint after {attempts} tries "
                                     "(other processes keep replacing it)")


def prune_remote(s3: Any, url: str, keep_last: int, keep_best: bool) -> None:
    """The POSIX pruning rule (`distseg.core.checkpoint.prune`) on the bucket's tags."""
    import obstore

    tags = remote_tags(s3)
    complete = [(t.step, t.tag, t.marker) for t in tags if t.state == checkpoint.COMPLETE]
    keep = {tag for _, tag, _ in complete[-keep_last:]}
    best = checkpoint.best_tag(complete) if keep_best else None
    if best:
        keep.add(best)
        obstore.put(s3, "checkpoints/best", best.encode())
    newest_kept = max((t.step for t in tags if t.tag in keep), default=-1)
    for t in tags:
        if t.tag in keep or t.step >= newest_kept:
            continue
        if t.state == checkpoint.UNREADABLE:
            logger.warning("%s/checkpoints/%s: cannot read its marker (%s); keeping it", url, t.tag, t.reason)
            continue
        keys = [o["path"] for batch in obstore.list(s3, f"checkpoints/{t.tag}/") for o in batch]
        marker_key = f"checkpoints/{t.tag}/{MARKER}"
        if marker_key in keys:  # the marker goes first: a half-deleted tag is never mistaken for a complete one
            obstore.delete(s3, marker_key)
        obstore.delete(s3, [k for k in keys if k != marker_key])
        logger.info("pruned %s/checkpoints/%s", url, t.tag)
