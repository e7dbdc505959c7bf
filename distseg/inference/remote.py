"""Models in an S3-compatible bucket: ``--model s3://bucket/prefix/...`` is fetched into a local cache folder, then
loaded as a local path by `distseg.inference.loading` / `distseg.inference.ensemble`.

What a URL may name (what the bucket holds decides, as for local paths):

- a run (``.../runs/NAME``, written by ``run.output_root=s3://...``): its best complete checkpoint (else the newest
  complete one), chosen by the bucket's markers with the POSIX rules (`distseg.core.checkpoint_s3`), plus the run's
  ``postprocessing.json`` and ``config.yaml`` when present; half-uploaded tags are never chosen;
- a checkpoint tag (``.../checkpoints/step_00000800``, complete);
- an exported ``model.pt`` / ``model.onnx`` with its ``.yaml`` (and the folder's ``postprocessing.json``);
- a cross-validation or ensemble folder (``ensemble.json`` naming its members by relative paths, as
  `launch/crossval.py` writes them; each member fetched as above) with its ``postprocessing.json``.

The cache (``$DISTSEG_CACHE``, default ``~/.cache/distseg``, under ``models/<bucket>/<prefix>``) keeps complete
tags: a complete checkpoint never changes, so a second call downloads only the small JSON files. Endpoint and
credentials come from the standard AWS variables or profiles (`distseg.data.remote`) and are never logged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from distseg.core import checkpoint
from distseg.core.checkpoint import MARKER, TAG_PREFIX
from distseg.data.location import is_remote
from distseg.inference.ensemble import ENSEMBLE_FILE
from distseg.inference.loading import POSTPROCESSING_FILE, ModelLoadError

logger = logging.getLogger(__name__)

RUN_FILES = (POSTPROCESSING_FILE, "config.yaml", "cases.json", "summary.json")
"""Small files of a run (or CV) folder fetched beside its checkpoint when the bucket has them."""
MODEL_SUFFIXES = (".pt", ".onnx")


def cache_root() -> Path:
    """Where fetched models live: ``$DISTSEG_CACHE/models`` (default ``~/.cache/distseg/models``)."""
    from distseg.data.remote import cache_base

    return cache_base() / "models"


def _local_dir(url: str, cache: Path) -> Path:
    """The cache folder mirroring `url`; refuses names that would leave it."""
    from distseg.data.remote import url_folder

    try:
        return url_folder(cache, url)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


def _store(url: str) -> Any:
    from distseg.data.remote import open_zarr_store

    return open_zarr_store(url, read_only=True, backend="obstore").store


def _error(url: str, e: BaseException) -> ModelLoadError:
    from distseg.data.remote import describe_error

    return ModelLoadError(f"cannot fetch the model: {describe_error(url, e)}")


def _get(s3: Any, key: str) -> bytes | None:
    import obstore

    try:
        return bytes(obstore.get(s3, key).bytes())
    except FileNotFoundError:
        return None


def _fetch_small(s3: Any, names: tuple[str, ...], dest: Path) -> None:
    """Copy the files `names` that the bucket has into `dest`; remove local ones the bucket no longer has (the cache
    says what the bucket says: a deleted postprocessing.json must not be applied from an old fetch)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        data = _get(s3, name)
        if data is None:
            (dest / name).unlink(missing_ok=True)
        else:
            (dest / name).write_bytes(data)


def _fetch_tag(s3: Any, key: str, dest: Path, url: str) -> Path:
    from distseg.core.checkpoint_s3 import download_tag

    if checkpoint.read_marker(dest) is not None:  # complete here already: tags never change once complete
        logger.info("%s: cached in %s", url, dest)
        return dest
    logger.info("downloading %s -> %s", url, dest)
    download_tag(s3, key, dest)
    return dest


def _fetch_run(s3: Any, url: str, dest: Path) -> Path:
    from distseg.core.checkpoint_s3 import complete_remote

    complete = complete_remote(s3)
    if not complete:
        raise ModelLoadError(f"{url}/checkpoints: no complete checkpoint in the bucket (a tag counts once its "
                             f"{MARKER} is uploaded); expected a run written with run.output_root=s3://...")
    tag = checkpoint.best_tag(complete) or complete[-1][1]
    _fetch_small(s3, RUN_FILES, dest)
    ckpt = dest / "checkpoints"
    _fetch_tag(s3, f"checkpoints/{tag}", ckpt / tag, f"{url}/checkpoints/{tag}")
    for other in checkpoint.scan_tags(ckpt):  # only the chosen tag: loading picks best/newest of what is here
        if other.tag != tag:
            shutil.rmtree(ckpt / other.tag, ignore_errors=True)
    return dest


def _fetch_file(url: str, dest: Path) -> Path:
    parent_url, name = url.rsplit("/", 1)
    s3 = _store(parent_url)
    sidecar = Path(name).with_suffix(".yaml").name
    data = _get(s3, name)
    if data is None:
        raise ModelLoadError(f"{url}: no such object in the bucket; expected an exported model file")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _fetch_small(s3, (sidecar, POSTPROCESSING_FILE), dest.parent)
    tmp = dest.with_name(f".{dest.name}.download")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return dest


def _fetch_ensemble(s3: Any, url: str, dest: Path, cache: Path) -> Path:
    _fetch_small(s3, (ENSEMBLE_FILE, POSTPROCESSING_FILE, "crossval.json"), dest)
    try:
        members = json.loads((dest / ENSEMBLE_FILE).read_text(encoding="utf-8"))["members"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{url}/{ENSEMBLE_FILE}: unreadable ensemble ({e})") from e
    for m in members:
        if not isinstance(m, str) or Path(m).is_absolute() or ".." in Path(m).parts:
            raise ModelLoadError(f"{url}/{ENSEMBLE_FILE}: member {m!r} is not a path inside the folder; an "
                                 "ensemble in a bucket names its members relative to it (as launch/crossval.py does)")
        fetch_model(f"{url}/{m}", cache)
    return dest


def fetch_model(url: str, cache: Path | None = None) -> Path:
    """Fetch the model `url` names (see the module docstring) into the cache; returns the local path to load."""
    cache = cache_root() if cache is None else cache
    url = url.rstrip("/")
    dest = _local_dir(url, cache)
    try:
        if url.endswith(MODEL_SUFFIXES):
            return _fetch_file(url, dest)
        s3 = _store(url)
        if _get(s3, ENSEMBLE_FILE) is not None:
            return _fetch_ensemble(s3, url, dest, cache)
        if _get(s3, MARKER) is not None and dest.name.startswith(TAG_PREFIX):
            return _fetch_tag(s3, "", dest, url)
        import obstore

        listing = obstore.list_with_delimiter(s3, "")
        if any(p.rstrip("/").endswith("checkpoints") for p in listing["common_prefixes"]):
            return _fetch_run(s3, url, dest)
    except ModelLoadError:
        raise
    except Exception as e:  # missing bucket, access denied, connection refused: said plainly
        raise _error(url, e) from e
    seen = sorted([*listing["common_prefixes"], *(o["path"] for o in listing["objects"])])[:8]
    raise ModelLoadError(f"{url}: not a model (found {', '.join(seen) if seen else 'nothing'}); expected a run "
                         "(checkpoints/), a checkpoint tag, model.pt/model.onnx or a cross-validation folder "
                         f"({ENSEMBLE_FILE})")


def localize(path: str | os.PathLike[str], cache: Path | None = None) -> Path:
    """A local path for `path`: itself, or the cached copy of an ``s3://`` model."""
    return fetch_model(str(path), cache) if is_remote(path) else Path(path).expanduser()
