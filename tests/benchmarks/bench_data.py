"""Training-loader throughput: augmented 4x128^3 patches per second per loader process.

Run: ``.venv/bin/python tests/benchmarks/bench_data.py [--store X.zarr] [--batches 12] [--patch 128]``

Without --store it converts the real BraTS 2018 samples (../shared/data/brats2018) into a temporary store with
`python -m preprocess brats --serial` (or, when that data is absent, a synthetic BraTS-like dataset from
`python -m preprocess synth`). Every row runs one loader process's work in this process with one thread (what a
DataLoader worker gets after `worker_init`), so "patches/s" is per loader process. Device-batched augmentation is
timed separately, on the accelerator when there is one (here: the CPU with all threads), as the training step
would run it. Ratios are against the no-augmentation baseline measured in the same run and against the 10/s target.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from distseg.data.augment import DeviceAugment
from distseg.data.config import AugmentConfig, DataConfig
from distseg.data.loader import build_device_augment, build_train_loader, worker_init

TARGET = 10.0
REPO = Path(__file__).resolve().parents[2]


def make_store(tmp: Path) -> Path:
    src = REPO.parent / "shared" / "data" / "brats2018"
    py = sys.executable
    if not src.is_dir():
        src = tmp / "synth"
        subprocess.run([py, "-m", "preprocess", "synth", "--kind", "brats", "--n", "3", "--dst", str(src),
                        "--shape", "160x192x144"], check=True)
    subprocess.run([py, "-m", "preprocess", "brats", "--src", str(src), "--dst", str(tmp), "--serial", "--folds", "2"],
                   check=True, capture_output=True)
    return tmp / "brats.zarr"


def loader_rate(cfg: DataConfig, batches: int) -> float:
    """Patches/s of one loader process (num_workers=0, one thread), after one warm-up batch."""
    it = iter(build_train_loader(replace(cfg, num_workers=0), rank=0, world_size=1, seed=0))
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * cfg.batch_size / (time.perf_counter() - t0)


def device_ms_per_patch(cfg: DataConfig, batches: int, device: torch.device) -> float:
    """Milliseconds per patch of the batched device augmentation (spatial + intensity + margin crop)."""
    aug: DeviceAugment = build_device_augment(cfg, seed=0)
    it = iter(build_train_loader(replace(cfg, num_workers=0), rank=0, world_size=1, seed=0))
    data = [next(it) for _ in range(min(batches, 4))]
    data = [(b["image"].to(device), b["label"].to(device), b["sample_index"]) for b in data]
    aug(*data[0])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    n = 0
    for i in range(batches):
        image, label, index = data[i % len(data)]
        aug(image, label, index + i * cfg.batch_size)  # fresh draws every batch
        n += image.shape[0]
    sync()
    return 1000 * (time.perf_counter() - t0) / n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=None)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--margin", type=int, default=16)
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> tuple[Path, list[tuple[str, float]], list[tuple[str, float]], str]:
    """(store, [(row, patches/s per loader process)], [(row, device ms/patch)], device description)."""
    tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
    store = args.store or make_store(Path(tmp.name))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpu_threads = torch.get_num_threads()

    base = DataConfig(store=str(store), patch_size=(args.patch,) * 3, batch_size=args.batch_size, val_folds=(99,))
    full = AugmentConfig()  # the default training augmentation
    always = replace(full, rotate_prob=1.0, scale_prob=1.0, gamma_prob=1.0, noise_prob=1.0)  # worst case
    m = args.margin
    rows = [
        ("no augmentation (crop from store only)", replace(base, augment=AugmentConfig(enabled=False))),
        ("device mode, worker part: crop + flips", base),
        (f"device mode, worker part: crop+{m} margin + flips", replace(base, context_margin=m)),
        ("CPU-worker full aug (default probs)", replace(base, augment=replace(full, on_device=False))),
        (f"CPU-worker full aug (default probs, +{m} margin)",
         replace(base, context_margin=m, augment=replace(full, on_device=False))),
        ("CPU-worker full aug (every transform, p=1)", replace(base, augment=replace(always, on_device=False))),
    ]
    worker_init(0)  # one thread, as in a loader worker
    results = [(name, loader_rate(cfg, args.batches)) for name, cfg in rows]
    torch.set_num_threads(cpu_threads)  # the training process keeps all its threads
    dev_rows = [
        ("default probs", base),
        (f"default probs, +{m} margin", replace(base, context_margin=m)),
        ("every transform, p=1", replace(base, augment=always)),
    ]
    dev = [(name, device_ms_per_patch(cfg, args.batches, device)) for name, cfg in dev_rows]
    tmp.cleanup()
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {cpu_threads} threads"
    return store, results, dev, where


def bench_rows(argv: list[str] | None = None) -> list[tuple[str, str, str, str, str, str]]:
    """Rows for tests/benchmarks/bench_train.py: (section, case, measured, baseline, ratio, target)."""
    _, results, dev, where = measure(parse_args(argv))
    baseline = results[0][1]
    rows = [("(c) loader", name, f"{rate:.2f} patches/s", f"{baseline:.2f} no-aug", f"{rate / baseline:.2f}x",
             f">= {TARGET:.0f}/s: {rate / TARGET:.2f}x") for name, rate in results]
    rows += [("(c) device aug", f"{name} ({where})", f"{ms:.1f} ms/patch", "-", "-", "-") for name, ms in dev]
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    store, results, dev, where = measure(args)
    baseline = results[0][1]
    print(f"\nstore {store}, patch 4x{args.patch}^3, batch {args.batch_size}, {args.batches} batches per row")
    print(f"{'loader process (1 thread)':<52} {'patches/s':>10} {'vs no-aug':>10} {'vs 10/s':>8}")
    for name, rate in results:
        print(f"{name:<52} {rate:>10.2f} {rate / baseline:>9.2f}x {rate / TARGET:>7.2f}x")
    print(f"\n{'device-batched aug in the train step (' + where + ')':<52} {'ms/patch':>10} {'patches/s':>10}")
    for name, ms in dev:
        print(f"{name:<52} {ms:>10.1f} {1000 / ms:>10.1f}")


if __name__ == "__main__":
    main()
