"""Time and peak memory per case of an ensemble of N models vs one model (`Predictor` on a `ModelSet`).

    python tests/benchmarks/bench_ensemble.py [--members 1 2 3 5] [--shape 4x128x160x128] [--features 12,24,48,96,192]
        [--patch 64] [--downsample 2] [--threads 1]

Each row runs in a fresh interpreter (its own high-water RSS, `getrusage`), predicting one real-shaped case (the
default: a cropped BraTS case, 4 x 128 x 160 x 128, as `configs/brats_budget.yaml` runs it: unet3d 12-192 on 64^3
windows at 2 mm) with N untrained members that share the window (the window-by-window path: each window batch cut
once and run through every member, one accumulator per member). Target (issue 13): time and memory per case <=
N x one model; the table prints both ratios against N = 1 measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, resource, sys, time
import torch
sys.path.insert(0, {repo!r})
from distseg.config import load_config
from distseg.inference.ensemble import ModelSet
from distseg.inference.loading import LoadedModel, ModelIO
from distseg.inference.predictor import Predictor
from distseg.models import build_model

torch.set_num_threads({threads})
cfg = load_config({repo!r} + "/configs/brats_budget.yaml")
io = ModelIO(kind="brats3d", channels=["t1", "t1ce", "t2", "flair"], target="regions",
             regions={{"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}}, mode="patch3d", patch_size=[{patch}] * 3,
             downsample={downsample})
members = []
for seed in range({n}):
    torch.manual_seed(seed)
    net = build_model("unet3d", "default", in_channels=4, out_channels=3, features={features}).eval()
    members.append(LoadedModel(io, cfg, module=net, source=f"m{{seed}}"))
predictor = Predictor(ModelSet(members), overlap=0.5, window_batch=2)
image = torch.randn({shape}, generator=torch.Generator().manual_seed(0))
predictor.probabilities(image)  # warm-up (allocator, kernels)
t0 = time.perf_counter()
predictor.probabilities(image)
seconds = time.perf_counter() - t0
print(json.dumps({{"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def run(n: int, args: argparse.Namespace) -> dict[str, float]:
    code = CHILD.format(repo=str(REPO), threads=args.threads, patch=args.patch, downsample=args.downsample, n=n,
                        features=[int(f) for f in args.features.split(",")],
                        shape=tuple(int(s) for s in args.shape.split("x")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, nargs="+", default=[1, 2, 3, 5])
    p.add_argument("--shape", default="4x128x160x128", help="C x Z x Y x X of the (stored, cropped) case")
    p.add_argument("--features", default="12,24,48,96,192")
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--downsample", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    rows = {n: run(n, args) for n in sorted(set([1, *args.members]))}
    base = rows[1]
    print(f"ensemble prediction of one {args.shape} case, unet3d {args.features}, {args.patch}^3 windows at "
          f"1/{args.downsample}, {args.threads} thread(s)")
    print("| members | s per case | x one model | peak RSS MiB | x one model | target (<= members) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, r in rows.items():
        t, m = r["seconds"] / base["seconds"], r["peak_mib"] / base["peak_mib"]
        ok = "yes" if t <= n * 1.02 and m <= n else "NO"
        print(f"| {n} | {r['seconds']:.2f} | {t:.2f} | {r['peak_mib']:.0f} | {m:.2f} | {ok} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
