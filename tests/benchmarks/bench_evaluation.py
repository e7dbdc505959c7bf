"""Peak memory of files-mode evaluation (`launch/evaluate.py --pred DIR --gt DIR`) over 10, 100 and 1000 cases.

    python tests/benchmarks/bench_evaluation.py [--sizes 10 100 1000] [--shape 64] [--workers 1] [--dst DIR]

Writes synthetic BraTS-like label volumes (`<case>.nii.gz`, brats2018 values, 1 mm, a tumour of WT/TC/ET shells
with a second small lesion) as ground truth and a perturbed copy as prediction (shifted by a voxel, one missed
small lesion, a false-positive island); one case in 50 has no prediction (a failed row, so the run exits 3).
`--variants` distinct volumes are written and the other case names are symlinks to them (what is measured is the
evaluation, not the generator). Each size runs the real command in a fresh interpreter, which reports its own
high-water RSS (`getrusage(RUSAGE_SELF)`) and that of its worker processes (`RUSAGE_CHILDREN`: the largest one);
this script also samples the RSS summed over the whole process tree every 20 ms. Flat memory means the three
columns do not grow with the number of cases: only rows are kept, never masks. Not a timing benchmark (run it on a
quiet machine if the seconds matter).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def _volume(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(gt, pred) uint8 (n, n, n) labels in the brats2018 convention {0, 1, 2, 4}."""
    grid = np.indices((n, n, n), dtype=np.float32)
    centre = rng.uniform(0.35 * n, 0.65 * n, 3)
    radius = rng.uniform(0.12 * n, 0.22 * n)
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
    gt = np.zeros((n, n, n), np.uint8)
    gt[r <= radius] = 2
    gt[r <= 0.6 * radius] = 4
    gt[r <= 0.3 * radius] = 1
    s = max(n // 16, 2)  # a second, small lesion far from the first: predicted missed
    gt[1:1 + s, 1:1 + s, n - 1 - s:n - 1] = 2
    pred = np.roll(gt, 1, axis=0)
    pred[1:1 + s + 1, 1:1 + s, n - 1 - s:n - 1] = 0
    pred[n - 1 - s:n - 1, 1:1 + s, 1:1 + s] = 2  # a false-positive island
    return gt, pred


def make_cases(root: Path, sizes: list[int], shape: int, variants: int, seed: int = 0) -> None:
    """root/all/{gt,pred}: `variants` distinct volume pairs; root/n<N>/{gt,pred}: N symlinked cases each."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    files = []
    for v in range(variants):
        gt, pred = _volume(rng, shape)
        paths = []
        for name, data in (("gt", gt), ("pred", pred)):
            path = root / "all" / name / f"variant{v:03d}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            img = nib.Nifti1Image(data, np.eye(4))
            img.set_data_dtype(np.uint8)
            nib.save(img, path)
            paths.append(path)
        files.append(paths)
    for n in sorted(set(sizes)):
        for name in ("gt", "pred"):
            (root / f"n{n}" / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            gt_path, pred_path = files[i % variants]
            os.symlink(gt_path, root / f"n{n}" / "gt" / f"case{i:05d}.nii.gz")
            if i % 50 != 49:  # every 50th case has no prediction: counted as failed
                os.symlink(pred_path, root / f"n{n}" / "pred" / f"case{i:05d}.nii.gz")



def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def measure(pred: Path, gt: Path, out: Path, workers: int) -> dict:
    """Run the evaluation in a fresh interpreter (`--child`); sample the tree's summed RSS meanwhile."""
    cmd = [sys.executable, __file__, "--child", str(pred), str(gt), str(out), str(workers)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    report = json.loads(proc.stdout.read().strip().splitlines()[-1])
    return {**report, "tree_peak": peak, "seconds": seconds}


def child(pred: str, gt: str, out: str, workers: str) -> None:
    """In the fresh interpreter: the real command's `main`, then its own and its workers' high-water RSS (KiB)."""
    sys.path.insert(0, str(REPO))
    from launch.evaluate import main

    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["--pred", pred, "--gt", gt, "--output", out, "--workers", workers])
    meta = json.loads((Path(out) / "evaluation.json").read_text())
    print(json.dumps({"exit": code, "n_cases": meta["n_cases"], "n_failed": meta["n_failed"],
                      "self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "workers_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:6])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--shape", type=int, default=64, help="cube side of the synthetic volumes (voxels)")
    parser.add_argument("--variants", type=int, default=20, help="distinct volumes written (the rest are links)")
    parser.add_argument("--workers", type=int, default=1, help="evaluate.py --workers")
    parser.add_argument("--dst", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_evaluation_")) if args.dst is None else args.dst
    try:
        if args.dst is not None:
            shutil.rmtree(root, ignore_errors=True)
        make_cases(root, args.sizes, args.shape, min(args.variants, max(args.sizes)))
        mib = 1024 * 1024
        print(f"files-mode evaluation, {args.shape}^3 label volumes, --workers {args.workers}")
        print("| cases | failed | exit | seconds | main process peak RSS (MiB) | largest worker peak RSS (MiB) "
              "| process tree peak RSS, sampled (MiB) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for n in args.sizes:
            r = measure(root / f"n{n}" / "pred", root / f"n{n}" / "gt", root / f"out{n}", args.workers)
            workers = f"{r['workers_kib'] / 1024:.0f}" if args.workers > 1 else "–"
            print(f"| {r['n_cases']} | {r['n_failed']} | {r['exit']} | {r['seconds']:.1f} | "
                  f"{r['self_kib'] / 1024:.0f} | {workers} | {r['tree_peak'] / mib:.0f} |", flush=True)
    finally:
        if args.dst is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
