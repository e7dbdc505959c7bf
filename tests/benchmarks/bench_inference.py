"""Whole-case 3D inference: distseg's sliding window vs MONAI's `sliding_window_inference`, same model and settings.

    .venv/bin/python tests/benchmarks/bench_inference.py [--device cpu|cuda] [--precision fp32|bf16]
        [--features 16,32,64,128,256] [--window 96] [--overlap 0.5] [--window-batch 2] [--repeats 2]

One case at the size of a real cropped BraTS case (the first case of ../shared/data/brats2018 converted in memory
with the converter's own function; a synthetic volume of the median cropped shape 140x172x138 when the data is
absent: time depends only on the shape). Both sides run the same `unet3d` (random weights, eval mode), the same
window, overlap, batch of windows and Gaussian importance (sigma 1/8 of the window), with and without mirror TTA
(MONAI has no built-in mirroring: its predictor is wrapped the usual way, flipping the whole image and running the
sliding window once per flip combination, 8x; distseg flips each window batch, the same 8x forwards). Each
configuration runs in a fresh subprocess (so peak memory is its own): CPU peak = growth of the RSS high-water mark
over the runs (warm-up included), CUDA peak = max_memory_allocated. Time = the fastest of `--repeats` runs after a
warm-up run; outputs of the two are compared (max |logit difference| within the window-placement differences of
the two libraries).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data" / "brats2018"
FALLBACK_SHAPE = (140, 172, 138)


def case_image(real: bool):
    """(C=4, Z, Y, X) float32 normalised image and where it came from."""
    import numpy as np

    if real and SHARED.is_dir():
        from preprocess.brats import prepare_brats_case
        from preprocess.discover import discover_brats

        case = discover_brats(SHARED)[0]
        arrays = prepare_brats_case(case)[0]
        return arrays.normalised(), f"{case.case_id} (real, cropped {tuple(arrays.image.shape[1:])})"
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, *FALLBACK_SHAPE)).astype(np.float32), f"synthetic {FALLBACK_SHAPE}"


def run_one(args: argparse.Namespace) -> dict:
    """Child process: time one implementation/mirroring setting."""
    import torch

    torch.set_num_threads(args.threads)
    from distseg.inference.window import SlidingWindow, sliding_window
    from distseg.models import build_model

    device = torch.device(args.device)
    image, source = case_image(not args.synthetic)
    torch.manual_seed(0)
    features = tuple(int(f) for f in args.features.split(","))
    model = build_model("unet3d", in_channels=4, out_channels=3, features=features).to(device).eval()
    window = (args.window,) * 3
    mirror = (0, 1, 2) if args.mirror else ()
    autocast = torch.bfloat16 if args.precision == "bf16" else None
    x = torch.from_numpy(image)

    if args.impl == "distseg":
        sw = SlidingWindow(window=window, overlap=args.overlap, window_batch=args.window_batch, mirror_axes=mirror)

        @torch.inference_mode()  # as distseg.inference.predictor.Predictor runs it (and as MONAI's side runs below)
        def infer() -> torch.Tensor:
            return sliding_window(model, x, sw, device=device, autocast_dtype=autocast)
    else:
        from monai.inferers import sliding_window_inference

        flip_sets = SlidingWindow(window=window, mirror_axes=mirror).mirror_sets

        @torch.inference_mode()
        def infer() -> torch.Tensor:
            inp = x[None].to(device)
            total = None
            for flips in flip_sets:
                dims = [2 + a for a in flips]
                xi = torch.flip(inp, dims) if dims else inp
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    y = sliding_window_inference(xi, window, args.window_batch, model, overlap=args.overlap,
                                                 mode="gaussian", sigma_scale=0.125, sw_device=device,
                                                 device=device)
                y = y.float()
                y = torch.flip(y, dims) if dims else y
                total = y if total is None else total + y
            return (total / len(flip_sets))[0]

    def timed() -> tuple[float, torch.Tensor]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = infer()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    # CPU: the RSS high-water mark can only grow, so its base is taken before the warm-up (model and case already
    # loaded): the peak is what inference itself added. CUDA: the allocator's peak after the warm-up.
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    timed()  # warm-up: allocator, kernels, importance map caches
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times, out = [], None
    for _ in range(args.repeats):
        t, out = timed()
        times.append(t)
    peak = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    assert out is not None
    if args.save:
        torch.save(out.cpu(), args.save)
    return {"seconds": min(times), "peak_bytes": int(peak), "source": source, "shape": list(image.shape),
            "params": sum(p.numel() for p in model.parameters())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--features", default="16,32,64,128,256", help="unet3d features (default: a CPU-sized width; "
                   "32,64,128,256,320,320 is the full nnU-Net plan)")
    p.add_argument("--window", type=int, default=96)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--window-batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--synthetic", action="store_true", help="use a synthetic volume of the median BraTS crop shape")
    p.add_argument("--no-mirror", action="store_true", help="skip the mirrored (8x) rows")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument("--impl", choices=["distseg", "monai"], help=argparse.SUPPRESS)
    p.add_argument("--mirror", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--save", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:  # child
        sys.stdout.write(json.dumps(run_one(args)) + "\n")
        return 0

    import tempfile

    import torch

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_inference_"))
    settings = [False] if args.no_mirror else [False, True]
    for mirror in settings:
        for impl in ("distseg", "monai"):
            out = tmp / f"{impl}_{int(mirror)}.pt"
            cmd = [sys.executable, __file__, "--impl", impl, "--device", args.device, "--precision", args.precision,
                   "--features", args.features, "--window", str(args.window), "--overlap", str(args.overlap),
                   "--window-batch", str(args.window_batch), "--repeats", str(args.repeats),
                   "--threads", str(args.threads), "--save", str(out)]
            cmd += ["--mirror"] if mirror else []
            cmd += ["--synthetic"] if args.synthetic else []
            env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
            if res.returncode != 0:
                sys.stderr.write(res.stderr[-3000:])
                return 1
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row.update(impl=impl, mirror=mirror)
            rows.append(row)
        a, b = (torch.load(tmp / f"{i}_{int(mirror)}.pt", weights_only=True) for i in ("distseg", "monai"))
        rows[-2]["max_abs_diff_vs_monai"] = float((a - b).abs().max())
        rows[-2]["label_agreement"] = float(((a > 0) == (b > 0)).float().mean())
    load = os.getloadavg()[0]
    first = rows[0]
    print(f"\nWhole-case 3D inference, {first['source']}, input {tuple(first['shape'])}; unet3d features "
          f"{args.features} ({first['params'] / 1e6:.2f}M params), window {args.window}^3, overlap {args.overlap}, "
          f"{args.window_batch} windows/batch, Gaussian sigma 1/8, {args.device} {args.precision}, "
          f"{args.threads} threads, load avg {load:.2f}\n")
    print("| implementation | mirror TTA | seconds/case | x MONAI | peak memory MiB | x MONAI |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for mirror in settings:
        ours = next(r for r in rows if r["impl"] == "distseg" and r["mirror"] == mirror)
        ref = next(r for r in rows if r["impl"] == "monai" and r["mirror"] == mirror)
        for r in (ours, ref):
            print(f"| {r['impl']} | {'8x' if mirror else 'off'} | {r['seconds']:.2f} | "
                  f"{r['seconds'] / ref['seconds']:.3f} | {r['peak_bytes'] / 2**20:.0f} | "
                  f"{r['peak_bytes'] / max(ref['peak_bytes'], 1):.2f} |")
    for mirror in settings:
        ours = next(r for r in rows if r["impl"] == "distseg" and r["mirror"] == mirror)
        print(f"\nmirror {'on' if mirror else 'off'}: max |logit diff| distseg vs MONAI "
              f"{ours['max_abs_diff_vs_monai']:.3g}, thresholded agreement {ours['label_agreement']:.5f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
