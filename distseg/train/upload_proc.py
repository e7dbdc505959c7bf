"""Uploads files to a bucket from a child process at a lower CPU priority (used by `distseg.train.mirror`).

    python -m distseg.train.upload_proc --url s3://bucket/run --prefix checkpoints/step_00000100 --nice 10 FILE...

Why a process and not a thread of the rank: an upload costs CPU (HTTP, TLS, checksums, obstore's runtime threads),
and on a training node the cores belong to the ranks and their loader workers. In a child process the whole upload,
runtime threads included, runs at `--nice` (Linux scheduling: a nice-10 task gets ~10 % of a core a nice-0 task
wants), shares no GIL with the training loop and cannot stall it. Endpoint and credentials come from the
environment (the standard AWS variables, inherited), never from the command line.

The child is deaf to the stop signals (SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2; blocked from before it starts,
then ignored): Slurm signals every process of a job step, and a preemption stop (exit 4) waits for the upload in
flight, which must not die with the ranks' signal. SIGKILL still ends it; a child whose rank died finishes its
files and exits (the tag stays incomplete: no marker).

Prints one JSON object on stdout: {"files": {file name: size in bytes} of what was put, in order, "nice": the
niceness the upload ran at}. Exit 0, or 1 with the error (naming the file and the URL) on stderr; a file already
put stays put (the tag is incomplete without its marker and the bucket rules ignore it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MAX_NICE = 19
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def bucket_store(url: str) -> Any:
    """The obstore S3Store rooted at `url` (endpoint and credentials from the standard AWS variables)."""
    from distseg.data.remote import open_zarr_store

    return open_zarr_store(url, read_only=False, backend="obstore").store


def put_files(url: str, prefix: str, files: list[Path]) -> dict[str, int]:
    """Put each of `files` at ``<url>/<prefix>/<name>`` (multipart for large ones); returns {name: size}."""
    import obstore

    store = bucket_store(url)
    sizes: dict[str, int] = {}
    for p in files:
        try:
            obstore.put(store, f"{prefix}/{p.name}", p)
        except Exception as e:
            raise OSError(f"{url}/{prefix}/{p.name}: upload of {p} failed ({type(e).__name__}: {e})") from e
        sizes[p.name] = p.stat().st_size
    return sizes


def upload_in_child(url: str, prefix: str, files: list[Path], nice: int) -> dict[str, int]:
    """Run `put_files` in a child process `nice` steps below this process's priority (0 = the same; the kernel
    caps niceness at 19); returns {name: size}. Raises OSError with the child's error when it fails."""
    cmd = [sys.executable, "-m", "distseg.train.upload_proc", "--url", url, "--prefix", prefix, "--nice", str(nice),
           *(str(p) for p in files)]
    package_root = str(Path(__file__).resolve().parents[2])  # the child imports this distseg, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    # Blocked signals are inherited through fork and exec: the child never has a moment where a stop signal kills
    # it. (This thread only: process-directed signals go to a thread that does not block them.)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if proc.returncode != 0:
        raise OSError(f"upload to {url}/{prefix} failed (exit {proc.returncode}): "
                      f"{proc.stderr.strip()[-2000:] or 'no message'}")
    out = json.loads(proc.stdout)
    logger.debug("%s/%s: %d files uploaded at nice %d", url, prefix, len(out["files"]), out["nice"])
    return out["files"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="s3://bucket/prefix of the run")
    p.add_argument("--prefix", required=True, help="key prefix under the URL (e.g. checkpoints/<tag>)")
    p.add_argument("--nice", type=int, default=0, help=f"added niceness, 0-{MAX_NICE}")
    p.add_argument("files", nargs="*", type=Path)
    for sig in STOP_SIGNALS:  # see the module docstring
        signal.signal(sig, signal.SIG_IGN)
    args = p.parse_args(argv)
    if not 0 <= args.nice <= MAX_NICE:
        p.error(f"--nice: expected 0-{MAX_NICE}, got {args.nice}")
    if args.nice:
        os.nice(args.nice)
    try:
        sizes = put_files(args.url, args.prefix, args.files)
    except OSError as e:
        print(e, file=sys.stderr)
        return 1
    print(json.dumps({"files": sizes, "nice": os.nice(0)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
