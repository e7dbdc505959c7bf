"""Opening a store with many cases: one `index.json` vs. listing `cases/` and reading every case's zarr.json.

    python tests/benchmarks/bench_store_open.py [--cases 10000] [--dst /tmp/bench_store_open]

Fabricates N case folders holding only their group metadata (copied from one real synthetic case, with its own
id and fold), which is all that opening, listing and planning samples read. Times what every rank, every loader
worker and every validation does on open: `Store.open`, the labelled training/validation case lists and each
case's info. Cold page cache is not attempted (a shared machine); the number of files read is the point.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from distseg.data.index import remove_index, write_index
from distseg.data.store import Store


def fabricate(dst: Path, n: int) -> Path:
    src = dst / "src"
    subprocess.run([sys.executable, "-m", "preprocess", "synth", "--kind", "brats", "--n", "1", "--dst", str(src),
                    "--shape", "32x32x16"], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "preprocess", "brats", "--src", str(src), "--dst", str(dst), "--name",
                    "many", "--serial"], check=True, capture_output=True)
    store = dst / "many.zarr"
    cases = store / "cases"
    (template,) = [p for p in cases.iterdir() if p.is_dir()]
    doc = json.loads((template / "zarr.json").read_text())
    for i in range(n):
        cid = f"Case{i:06d}"
        (cases / cid).mkdir(exist_ok=True)
        doc["attributes"].update(case_id=cid, fold=i % 5)
        (cases / cid / "zarr.json").write_text(json.dumps(doc))
    shutil.rmtree(template)
    return store


def open_like_a_rank(store_path: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    store = Store.open(store_path)
    train = store.case_ids(exclude_folds=[0], labelled_only=True)
    val = store.case_ids(folds=[0], labelled_only=True)
    shapes = [store.case(c).shape for c in train + val]
    return time.perf_counter() - t0, len(shapes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--dst", type=Path, default=Path("/tmp/bench_store_open"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shutil.rmtree(args.dst, ignore_errors=True)
    store = fabricate(args.dst, args.cases)
    remove_index(store)
    per_case = [open_like_a_rank(store) for _ in range(args.repeats)]
    t0 = time.perf_counter()
    write_index(store)
    t_index = time.perf_counter() - t0
    indexed = [open_like_a_rank(store) for _ in range(args.repeats)]
    best_old, best_new = min(t for t, _ in per_case), min(t for t, _ in indexed)
    size = (store / "index.json").stat().st_size
    print(f"| {args.cases} cases | open + list + every case's info | files read |")
    print("| --- | --- | --- |")
    print(f"| per-case zarr.json (no index) | {best_old:.3f} s | {args.cases + 1} |")
    print(f"| index.json ({size / 1e6:.1f} MB) | {best_new:.3f} s | 2 |")
    print(f"speed-up {best_old / best_new:.1f}x; writing the index (driver, once per preprocessing run): "
          f"{t_index:.2f} s")
    shutil.rmtree(args.dst, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
