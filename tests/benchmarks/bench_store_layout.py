"""Sharded vs chunked stores on the real BraTS cases (run by hand; prints a table, asserts nothing).

    python tests/benchmarks/bench_store_layout.py [--cases 6] [--seconds 20]

Converts the first N cases of ../shared/data/brats2018 twice (`--layout sharded`, the default, and `--layout
chunked`, the layout before issue 14), then on one pinned core reads random 4x128^3 patches (image normalised +
label, `Store.read_patch`, the training read) from random cases through one open `Store`, as a loader worker
does. Reports files per case, the store's files opened per patch (counted with a Python audit hook on `open`,
which `os.open` and `open()` both raise; the first patch of a case, then another patch of it), patches/s, and
bytes on disk vs the cases' .nii.gz files.
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
DATA = REPO.parent / "shared" / "data" / "brats2018"


def _du(path: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_layout_"))
    src = work / "src"
    src.mkdir()
    for case in sorted(DATA.iterdir())[: args.cases]:
        os.symlink(case, src / case.name)
    nii = sum(_du(case, "*.nii.gz") for case in sorted(DATA.iterdir())[: args.cases])
    stores = {}
    for layout in ("sharded", "chunked"):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "preprocess", "brats", "--src", str(src), "--dst", str(work / layout),
                        "--name", "b", "--serial", "--layout", layout], check=True, capture_output=True, cwd=REPO)
        stores[layout] = (work / layout / "b.zarr", time.perf_counter() - t0)

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import numcodecs.blosc

    numcodecs.blosc.set_nthreads(1)
    from distseg.data.store import Store

    opened: list[str] = []
    counting = [False]

    def hook(event: str, hook_args: tuple) -> None:  # the store's files only (not modules imported on the way)
        if counting[0] and event == "open" and str(hook_args[0]).startswith(str(work)):
            opened.append(str(hook_args[0]))

    sys.addaudithook(hook)
    print(f"{args.cases} BraTS 2018 cases, random 4x128^3 patches (float32 image + uint8 label), one pinned core; "
          "shared 2-core machine")
    print("| layout | convert s | files per case | files opened per patch (first touch / warm) | patches/s | "
          "bytes vs .nii.gz |")
    print("| --- | --- | --- | --- | --- | --- |")
    for layout, (path, convert_s) in stores.items():
        store = Store.open(path)
        cids = store.case_ids()
        rng = np.random.default_rng(0)

        def patch(store=store, cids=cids, rng=rng) -> None:
            cid = cids[int(rng.integers(len(cids)))]
            shape = store.case(cid).shape[1:]
            start = [int(rng.integers(0, max(n - 128, 0) + 1)) for n in shape]
            store.read_patch(cid, tuple(start), (128, 128, 128))

        counting[0] = True
        patch(store, [cids[0]])
        first = len(opened)
        opened.clear()
        patch(store, [cids[0]])
        warm = len(opened)
        counting[0] = False
        opened.clear()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            patch()
            n += 1
        rate = n / (time.perf_counter() - t0)
        files = sum(1 for p in (path / "cases").rglob("*") if p.is_file()) / len(cids)
        size = _du(path / "cases")
        print(f"| {layout} | {convert_s:.1f} | {files:.0f} | {first} / {warm} | {rate:.1f} | {size / nii:.3f} |",
              flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
