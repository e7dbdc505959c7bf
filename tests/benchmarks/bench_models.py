"""Benchmark every registered model (default preset) at its training size: forward+backward time, FLOPs, memory.

    .venv/bin/python tests/benchmarks/bench_models.py [--device cpu|cuda] [--steps 2] [--size3d 128] [--threads 2]

Each model runs in its own subprocess so peak-memory numbers do not leak between models:
  - CPU: peak RSS growth during the measured steps, from resource.getrusage(RUSAGE_SELF).ru_maxrss (high-water mark
    of the child after building the model and one warm-up input, subtracted from the mark after the steps). It
    counts activations, gradients and optimizer-free autograd buffers; tracemalloc cannot see torch's allocator.
  - CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the memory held before the step.
FLOPs per sample come from distseg.models.summary (forward only, 2 × MACs of conv/linear + 2 per norm element);
"fwd+bwd s/sample" is wall time of forward + backward (no optimizer step) divided by the batch size, the fastest of
`--steps` timed steps after `--warmup` untimed ones (the minimum is the least disturbed by other processes on a
shared machine; the load average is printed with the table). The ratio columns divide by `unet` measured in the
same run.
Rows with "+ckpt" run the same model with activation_checkpointing=True.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from distseg.models import available_models, build_model
from distseg.models.summary import summarize

BASELINE = "unet"


def measure_one(
    name: str, device: str, batch: int, spatial: tuple[int, ...], steps: int, warmup: int, ckpt: bool
) -> dict:
    """Build `name`, time `steps` forward+backward passes, report per-sample time and peak memory (child process)."""
    torch.manual_seed(0)
    model = build_model(name, activation_checkpointing=ckpt).to(device).train()
    if model.spatial_dims == 2:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, model.in_channels, *spatial, device=device)
    if model.spatial_dims == 2:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(x)
        out = out if isinstance(out, torch.Tensor) else out[0]
        out.float().square().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = [step() for _ in range(warmup + steps)][warmup:]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"s_per_sample": min(times) / batch, "peak_bytes": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model (after one warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--batch2d", type=int, default=2)
    parser.add_argument("--size2d", type=int, default=256)
    parser.add_argument("--batch3d", type=int, default=1)
    parser.add_argument("--size3d", type=int, default=128, help="3D patch edge (128 = the training size)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--models", default=",".join(available_models()))
    parser.add_argument("--no-ckpt", action="store_true", help="skip the activation-checkpointing rows for 3D models")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: NAME[+ckpt]
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.one:
        name, _, flag = args.one.partition("+")
        spatial_dims = build_model(name, "debug").spatial_dims
        spatial = (args.size2d,) * 2 if spatial_dims == 2 else (args.size3d,) * 3
        batch = args.batch2d if spatial_dims == 2 else args.batch3d
        result = measure_one(name, args.device, batch, spatial, args.steps, args.warmup, flag == "ckpt")
        sys.stdout.write(json.dumps(result) + "\n")
        return 0

    names = args.models.split(",")
    if BASELINE not in names:
        names.insert(0, BASELINE)
    runs = []
    for name in names:
        runs.append(name)
        if not args.no_ckpt and build_model(name, "debug").spatial_dims == 3:
            runs.append(f"{name}+ckpt")
    rows = []
    load_before = os.getloadavg()[0]
    for run in runs:
        name = run.split("+")[0]
        with torch.device("meta"):
            meta = build_model(name)
        spatial = (args.size2d,) * 2 if meta.spatial_dims == 2 else (args.size3d,) * 3
        batch = args.batch2d if meta.spatial_dims == 2 else args.batch3d
        summary = summarize(meta, (meta.in_channels, *spatial))
        cmd = [sys.executable, __file__, "--one", run, *sys.argv[1:]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if proc.returncode != 0:
            sys.stderr.write(f"{run}: failed\n{proc.stderr[-2000:]}\n")
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        shape = "×".join(map(str, (batch, meta.in_channels, *spatial)))
        rows.append({"run": run, "params": summary.params, "input": shape, "gflops": summary.flops / 1e9, **res,
                     "wall": time.perf_counter() - t0})
        sys.stderr.write(f"{run}: {res['s_per_sample']:.2f} s/sample, {res['peak_bytes'] / 2**30:.2f} GiB\n")

    base = next(r for r in rows if r["run"] == BASELINE)
    mem_kind = "CUDA max_memory_allocated" if args.device == "cuda" else "RSS high-water growth (getrusage)"
    sys.stdout.write(
        f"device={args.device} threads={args.threads} torch={torch.__version__} memory: {mem_kind}; "
        f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n"
    )
    header = (f"| model | params | input (B×C×spatial) | GFLOPs/sample (fwd) | fwd+bwd s/sample | × {BASELINE} time "
              f"| peak mem GiB | × {BASELINE} mem |")
    sys.stdout.write(header + "\n|" + "---|" * 8 + "\n")
    for r in rows:
        sys.stdout.write(
            f"| {r['run']} | {r['params'] / 1e6:.1f}M | {r['input']} | {r['gflops']:.1f} | {r['s_per_sample']:.3f} | "
            f"{r['s_per_sample'] / base['s_per_sample']:.2f} | {r['peak_bytes'] / 2**30:.2f} | "
            f"{r['peak_bytes'] / max(base['peak_bytes'], 1):.2f} |\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
