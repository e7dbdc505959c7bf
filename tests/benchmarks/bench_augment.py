"""CPU cost of each augmentation transform per batch, against the flips-only pipeline, measured in one run.

    PYTHONPATH=$PWD .venv/bin/python tests/benchmarks/bench_augment.py [--reps 10] [--threads 1] [--margin 0]

Two batches, as the budget configs train: 3D 2x4x64^3 (brats_budget: patch3d, 64^3 after downsample 2) and 2D
8x3x128^2 (lgg_budget: image2d, 128^2). Each row is a whole training-batch augmentation: per-sample flips in numpy
(the loader worker's `apply_flips` + the collate copy into the batch buffer, every flip drawn as the sampler draws
it) followed by `DeviceAugment` on the CPU tensor, with only the named transform switched on at probability 1
(channel probabilities 1 too). "flips only" is the pipeline that yields the same batch with the device augmentation
disabled (crop only): the pipeline of a config with every transform off. "defaults" is `AugmentConfig()` (what the
shipped configs run), "nnU-Net preset" is `AugmentConfig.nnunet(nd)` with its probabilities (averaged over `--reps`
batches of different sample indices), "all at p=1" every transform at once. ms are means over `--reps` batches
after one warm-up batch, in CPU time of this process (`time.process_time`: with one thread, what the batch costs a
core, much less disturbed by other processes than wall time); ratio = row / flips only. Compare rows of one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from distseg.data.augment import DeviceAugment, apply_flips
from distseg.data.config import AugmentConfig

OFF = {
    "rotate_prob": 0.0, "scale_prob": 0.0, "intensity_scale": (1.0, 1.0), "intensity_shift": 0.0, "gamma_prob": 0.0,
    "noise_prob": 0.0,
}
ALONE = {
    "rotation": {"rotate_prob": 1.0},
    "scaling": {"scale_prob": 1.0},
    "elastic": {"elastic_prob": 1.0},
    "noise": {"noise_prob": 1.0},
    "blur": {"blur_prob": 1.0, "blur_channel_prob": 1.0},
    "brightness": {"intensity_scale": (0.75, 1.25), "intensity_prob": 1.0},
    "contrast": {"contrast_prob": 1.0},
    "low resolution": {"lowres_prob": 1.0, "lowres_channel_prob": 1.0},
    "gamma": {"gamma_prob": 1.0},
    "gamma inverted + stats": {"gamma_invert_prob": 1.0, "gamma_retain_stats": True},
}


def configs(nd: int) -> dict[str, AugmentConfig | None]:
    out: dict[str, AugmentConfig | None] = {"flips only": None}
    out.update({name: AugmentConfig(**{**OFF, **kw}) for name, kw in ALONE.items()})
    out["defaults (shipped configs)"] = AugmentConfig()
    out["nnU-Net preset"] = AugmentConfig.nnunet(nd)
    every = {k: v for kw in ALONE.values() for k, v in kw.items()}
    out["all at p=1"] = dataclasses.replace(AugmentConfig.nnunet(nd), **every)
    return out


def one_batch(
    samples: list[tuple[np.ndarray, np.ndarray]], aug: DeviceAugment, first: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips per sample into one batch buffer (as `TrainBatches.__getitem__`), then the batch augmentation."""
    nd = samples[0][1].ndim
    image = np.empty((len(samples), *samples[0][0].shape), np.float32)
    label = np.empty((len(samples), *samples[0][1].shape), np.uint8)
    for j, (img, lab) in enumerate(samples):
        axes = tuple(a for a in range(nd) if rng.random() < 0.5)
        image[j], label[j] = apply_flips(img, lab, axes)
    index = torch.arange(first, first + len(samples))
    return aug(torch.from_numpy(image), torch.from_numpy(label), index)


def bench(shape: tuple[int, ...], reps: int, margin: int) -> list[tuple[str, float]]:
    b, c, *patch = shape
    nd = len(patch)
    size = [p + 2 * margin for p in patch]
    rng = np.random.default_rng(0)
    samples = [(rng.normal(size=(c, *size)).astype(np.float32), rng.integers(0, 4, size, dtype=np.uint8))
               for _ in range(b)]
    rows = []
    for name, cfg in configs(nd).items():
        aug = (DeviceAugment(AugmentConfig(), patch, margin, seed=0, enabled=False) if cfg is None
               else DeviceAugment(cfg, patch, margin, seed=0))
        flip_rng = np.random.default_rng(1)
        one_batch(samples, aug, 0, flip_rng)  # warm-up
        t0 = time.process_time()
        for r in range(reps):
            one_batch(samples, aug, (r + 1) * b, flip_rng)
        rows.append((name, (time.process_time() - t0) / reps * 1e3))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10, help="timed batches per row")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a loader worker / one-core rank uses 1)")
    ap.add_argument("--margin", type=int, default=0, help="context margin (data.context_margin) around each patch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), margin {args.margin}, {args.reps} batches per row\n")
    for shape in ((2, 4, 64, 64, 64), (8, 3, 128, 128)):
        rows = bench(shape, args.reps, args.margin)
        base = rows[0][1]
        print(f"batch {'x'.join(map(str, shape))}")
        print(f"| {'transform':<28} | {'CPU ms/batch':>12} | {'vs flips only':>13} |")
        print(f"|{'-' * 30}|{'-' * 13}:|{'-' * 14}:|")
        for name, ms in rows:
            print(f"| {name:<28} | {ms:>12.1f} | {ms / base:>12.2f}x |")
        print()


if __name__ == "__main__":
    main()
