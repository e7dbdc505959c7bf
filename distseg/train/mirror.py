"""A run whose `run.output_root` is ``s3://bucket/prefix``: written locally (`ExperimentConfig.run_dir`, the staging
folder on each node), uploaded in the background, resumed from the bucket.

Checkpoints (``<run_url>/checkpoints/<tag>/``):

1. every rank saves the tag locally as on POSIX (`distseg.core.checkpoint.save`);
2. the first rank of each node uploads the files of the tag that its node's ranks wrote (`node_files`: by the rank
   in the file name; the staging folder may be node-local or shared, each file goes up once), then puts
   ``<tag>/uploaded/node<k>.json`` listing them with their sizes: training goes on meanwhile (one background
   thread per node drives a child process that puts the files at `checkpoint.upload_nice`, so that the upload's CPU
   yields to the ranks and their loaders: `distseg.train.upload_proc`; the next save waits only if the previous
   upload is still running);
3. rank 0's thread waits for every node's list, checks each listed object's size in the bucket, then puts
   ``COMPLETE.json`` (the local marker with every node's files) LAST, then ``latest``, then prunes the bucket;
4. a tag without ``COMPLETE.json`` in the bucket (an upload killed half-way) is ignored, and deleted once a newer
   complete tag is kept (the POSIX rule: a tag whose marker cannot be read is kept).

Resume (`download_newest`, collective, before `elastic.plan_resume`): rank 0 picks the newest complete tag in the
bucket; each node's first rank downloads it into its staging folder (unless already there) and removes local tags
newer than it (never uploaded completely, so the other nodes may lack them). TensorBoard events, the resolved
config and `summary.json` are uploaded by rank 0 with each checkpoint and at the end. Checkpoint objects are moved
with obstore directly (multipart for large files); everything else goes through zarr's storage layer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from distseg.core import checkpoint, dist
from distseg.core.checkpoint import MARKER, TAG_PREFIX, CheckpointError
from distseg.core.checkpoint_s3 import download_tag, newest_complete_remote, prune_remote
from distseg.train.upload_proc import bucket_store, upload_in_child

logger = logging.getLogger(__name__)

UPLOADED = "uploaded"
"""Sub-prefix of a tag in the bucket holding one file list per node."""
NODE_WAIT_S = 3600.0
"""How long rank 0 waits for the other nodes' uploads of a tag before leaving it incomplete (ignored)."""


_RANK_IN_NAME = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)")


def file_rank(name: str) -> int:
    """The global rank that writes checkpoint file `name`: DeepSpeed's ZeRO shards carry their data-parallel rank
    (``[bf16_]zero_pp_rank_<r>_mp_rank_00_{optim,model}_states.pt``; distseg is data-parallel only, so it is the
    global rank) and distseg's RNG states theirs (``rng_rank<r>.pt``); everything else (ZeRO 0-2 model states,
    ``trainer_state.json``) is written by rank 0."""
    m = _RANK_IN_NAME.search(name)
    return int(m.group(1)) if m else 0


def node_files(tag_dir: Path, node: int, local_size: int) -> list[Path]:
    """The files of `tag_dir` (top level, without the local marker) written by node `node`'s ranks
    (``rank // local_size == node``): each node uploads only these, whether it sees only its own files (node-local
    staging) or every node's (a shared staging folder)."""
    return [p for p in sorted(tag_dir.iterdir())
            if p.is_file() and p.name != MARKER and file_rank(p.name) // max(1, local_size) == node]


def _local_size() -> int:
    """Ranks per node (`LOCAL_SIZE`, set by DeepSpeed's launcher; 1 without it)."""
    return max(1, int(os.environ.get("LOCAL_SIZE", "1")))


def _node_index() -> tuple[int, int]:
    """(this node's index, number of nodes): ranks are laid out node by node (`LOCAL_SIZE` ranks each)."""
    local = _local_size()
    return dist.rank() // local, max(1, dist.world_size() // local)


class RunMirror:
    """Uploads one rank's share of a run to ``run_url`` (no-op object for a POSIX run: see `build_mirror`)."""

    def __init__(self, run_dir: Path, run_url: str, keep_last: int, keep_best: bool, upload_nice: int) -> None:
        self.run_dir, self.url = run_dir, run_url.rstrip("/")
        self.keep_last, self.keep_best = keep_last, keep_best
        self.upload_nice = upload_nice
        self.node, self.nodes = _node_index()
        self.local_size = _local_size()
        self.uploads_files = dist.local_rank() == 0
        self.rank0 = dist.rank() == 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="upload") if self.uploads_files else None
        self._pending: Future | None = None
        self._lock = threading.Lock()
        self.s3 = bucket_store(self.url)

    # ---------------------------------------------------------------------------------------------- resume
    def download_newest(self) -> str | None:
        """Collective: make the bucket's newest complete checkpoint the newest one in every node's staging folder.
        Returns its tag (None: the bucket has none)."""
        tag: str | None | Exception = None
        if self.rank0:
            try:
                tag = newest_complete_remote(self.s3)
            except Exception as e:  # said on every rank below
                tag = CheckpointError(f"{self.url}/checkpoints: cannot read the checkpoints ({e})")
        tag = dist.broadcast_object(tag)
        if isinstance(tag, Exception):
            raise tag
        if self.uploads_files:
            ckpt = self.run_dir / "checkpoints"
            for local in checkpoint.scan_tags(ckpt):  # never uploaded completely: other nodes may lack it
                if tag is None or local.step > int(tag.removeprefix(TAG_PREFIX)):
                    logger.warning("staging %s: %s is not complete in %s; removing it", ckpt, local.tag, self.url)
                    shutil.rmtree(ckpt / local.tag, ignore_errors=True)
            if tag is not None and checkpoint.read_marker(ckpt / tag) is None:
                self._download_tag(tag, ckpt / tag)
        dist.barrier()
        return tag

    def _download_tag(self, tag: str, dest: Path) -> None:
        download_tag(self.s3, f"checkpoints/{tag}", dest)
        logger.info("downloaded checkpoint %s from %s", tag, self.url)

    # ---------------------------------------------------------------------------------------------- upload
    def after_save(self, tag: str) -> None:
        """Every rank, right after `checkpoint.save(...)` of `tag` returned: start this node's upload."""
        if not self.uploads_files:
            return
        self.wait_previous(tag)  # the previous tag's upload must finish before local pruning can touch its files
        self._pending = self._pool.submit(self._upload_tag, tag)

    def wait_previous(self, tag: str) -> float:
        """Wait for the previous tag's upload before `tag`'s starts; returns the seconds training stood still for
        it, and says so when it did: uploads that outlast a checkpoint interval stall training at every save."""
        pending = self._pending
        if pending is None or pending.done():
            self.wait()
            return 0.0
        t0 = time.monotonic()
        self.wait()
        waited = time.monotonic() - t0
        logger.warning("checkpoint %s: training waited %.1f s for the previous checkpoint's upload to %s; an upload "
                       "takes longer than checkpoint.every steps here: save less often (or raise the bucket's "
                       "bandwidth)", tag, waited, self.url)
        return waited

    def _upload_tag(self, tag: str) -> None:
        import obstore

        tag_dir = self.run_dir / "checkpoints" / tag
        files = upload_in_child(self.url, f"checkpoints/{tag}", node_files(tag_dir, self.node, self.local_size),
                                nice=self.upload_nice)
        obstore.put(self.s3, f"checkpoints/{tag}/{UPLOADED}/node{self.node:05d}.json", json.dumps(files).encode())
        if self.rank0:
            local_marker = json.loads((tag_dir / MARKER).read_text(encoding="utf-8"))
            self._complete(tag, local_marker)
            self.upload_run_files()

    def _complete(self, tag: str, marker: dict[str, Any]) -> None:
        """Rank 0: once every node's files are in the bucket, put the marker (last), `latest`, then prune."""
        import obstore

        deadline = time.monotonic() + NODE_WAIT_S
        files: dict[str, int] = {}
        for node in range(self.nodes):
            key = f"checkpoints/{tag}/{UPLOADED}/node{node:05d}.json"
            while True:
                try:
                    files.update(json.loads(bytes(obstore.get(self.s3, key).bytes())))
                    break
                except FileNotFoundError:
                    if time.monotonic() > deadline:
                        logger.error("%s/checkpoints/%s: node %d never finished its upload; the tag stays "
                                     "incomplete (ignored)", self.url, tag, node)
                        return
                    time.sleep(1.0)
        for name, size in files.items():
            if obstore.head(self.s3, f"checkpoints/{tag}/{name}")["size"] != size:
                logger.error("%s/checkpoints/%s/%s: wrong size in the bucket; the tag stays incomplete", self.url,
                             tag, name)
                return
        obstore.put(self.s3, f"checkpoints/{tag}/{MARKER}", json.dumps({**marker, "files": files}, indent=1).encode())
        obstore.put(self.s3, "checkpoints/latest", tag.encode())
        prune_remote(self.s3, self.url, self.keep_last, self.keep_best)
        logger.info("checkpoint %s uploaded to %s", tag, self.url)

    def upload_run_files(self) -> None:
        """Rank 0: the resolved config, summary.json and TensorBoard events (everything but checkpoints)."""
        if not self.rank0:
            return
        import obstore

        with self._lock:
            for p in sorted(self.run_dir.rglob("*")):
                rel = p.relative_to(self.run_dir).as_posix()
                if p.is_file() and not rel.startswith("checkpoints/"):
                    obstore.put(self.s3, rel, p)

    def wait(self) -> None:
        """Block until this node's pending upload (and, on rank 0, the marker) is done; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """At the end of the run or a stop (exit 4): wait for the upload, then upload the run's other files."""
        self.wait()
        self.upload_run_files()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class NullMirror:
    """A POSIX run: nothing to upload."""

    def download_newest(self) -> None:
        return None

    def after_save(self, tag: str) -> None:
        pass

    def wait(self) -> None:
        pass

    def close(self) -> None:
        pass


def build_mirror(run_dir: Path, run_url: str | None, keep_last: int, keep_best: bool, upload_nice: int
                 ) -> RunMirror | NullMirror:
    return NullMirror() if run_url is None else RunMirror(run_dir, run_url, keep_last, keep_best, upload_nice)
