"""Patch reads from a loopback S3 server vs POSIX, and obstore vs FsspecStore + s3fs (run by hand).

    python tests/benchmarks/bench_store_remote.py [--cases 4] [--seconds 15]

Converts the first N real BraTS 2018 cases (sharded, the default layout), uploads the store to a moto S3 server
on 127.0.0.1, then on one pinned core reads random 4x128^3 patches through `Store` from the folder and from
``s3://`` with each zarr storage backend, counting the server's GET requests per patch (warm: array handles and
shard indexes cached, as in a loader worker after its first patches). moto is a Python server sharing the
machine's 2 cores with the reader: absolute remote rates are a floor, the GET counts are exact.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "brats2018"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_remote_"))
    src = work / "src"
    src.mkdir()
    for case in sorted(DATA.iterdir())[: args.cases]:
        os.symlink(case, src / case.name)
    subprocess.run([sys.executable, "-m", "preprocess", "brats", "--src", str(src), "--dst", str(work), "--name",
                    "b", "--serial"], check=True, capture_output=True, cwd=REPO)
    local = work / "b.zarr"

    import logging

    from moto.server import ThreadedMotoServer

    from tests.s3server import CREDENTIALS, S3Server, _RequestLog, upload_tree

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=True)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, **CREDENTIALS)
    log = S3Server(endpoint, {})
    logging.getLogger("werkzeug").addHandler(_RequestLog(log))
    logging.getLogger("werkzeug").setLevel(logging.INFO)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    upload_tree(local, "bench", "b.zarr", endpoint)

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import numcodecs.blosc

    numcodecs.blosc.set_nthreads(1)
    from distseg.data import remote
    from distseg.data.store import Store

    print(f"{args.cases} BraTS 2018 cases, sharded store, random 4x128^3 patches, one pinned core, moto S3 on "
          "127.0.0.1 (shared 2-core machine)")
    print("| source | patches/s | GET per patch (warm) | x POSIX |")
    print("| --- | --- | --- | --- |")
    posix = None
    for name, where, backend in (("POSIX", str(local), None), ("S3 obstore", "s3://bench/b.zarr", "obstore"),
                                 ("S3 FsspecStore + s3fs", "s3://bench/b.zarr", "fsspec")):
        if backend:
            remote.DEFAULT_BACKEND = backend
        store = Store.open(where)
        cids = store.case_ids()
        rng = np.random.default_rng(0)

        def patch(store=store, cids=cids, rng=rng) -> None:
            cid = cids[int(rng.integers(len(cids)))]
            shape = store.case(cid).shape[1:]
            start = [int(rng.integers(0, max(n - 128, 0) + 1)) for n in shape]
            store.read_patch(cid, tuple(start), (128, 128, 128))

        for _ in range(3 * len(cids)):
            patch()  # warm: every case's handles and shard indexes
        log.requests.clear()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            patch()
            n += 1
        rate = n / (time.perf_counter() - t0)
        gets = log.count("GET") / n
        posix = posix or rate
        print(f"| {name} | {rate:.1f} | {gets:.2f} | {rate / posix:.2f} |", flush=True)
    server.stop()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
