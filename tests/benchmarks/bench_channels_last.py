"""Channels-last convolutions (`distseg.models.memory_format.use_channels_last`) against the default layout, in the
same process: one training step (forward + backward + AdamW) and one forward in eval mode, per model.

    python tests/benchmarks/bench_channels_last.py [--threads 1] [--steps 4]
    python tests/benchmarks/bench_channels_last.py --device cuda --precision bf16    (from `make gpu-check`)

Prints a table with the seconds per step of each layout and the ratio default / channels-last (> 1: channels-last
is faster), and the last loss of both (they must agree). `model.channels_last: auto` follows what this shows on
the CPU (3D on, 2D off); `make gpu-check` measures the same on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distseg.models import build_model  # noqa: E402
from distseg.models.memory_format import use_channels_last  # noqa: E402

GPU_CASES = [  # training sizes of the full models
    ("unet3d 32-320 (31M)", "unet3d", {}, (2, 4, 128, 128, 128)),
    ("res_inception_unet (65.8M)", "res_inception_unet", {"in_channels": 3, "out_channels": 1}, (8, 3, 256, 256)),
]
CASES = [  # (label, model, overrides, input shape)
    ("unet3d 8-128", "unet3d", {"features": (8, 16, 32, 64, 128)}, (2, 4, 64, 64, 64)),
    ("unet3d 12-192", "unet3d", {"features": (12, 24, 48, 96, 192)}, (2, 4, 64, 64, 64)),
    ("res_inception_unet 16-128", "res_inception_unet",
     {"in_channels": 3, "out_channels": 1, "encoder_channels": (16, 32, 64, 128), "bottleneck_channels": 256},
     (4, 3, 128, 128)),
    ("unet (31M)", "unet", {"in_channels": 3, "out_channels": 1}, (4, 3, 128, 128)),
]


def timed(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, train: bool,
          dtype: torch.dtype | None) -> tuple[float, float]:
    """Mean seconds per step after one warm-up step, and the last loss (autocast to `dtype` unless None)."""
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    model.train(train)
    times, loss = [], torch.zeros(())
    for _ in range(steps + 1):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None), torch.set_grad_enabled(train):
            out = model(x)
            out = out[0] if isinstance(out, list) else out
            loss = F.binary_cross_entropy_with_logits(out.float(), y)
        if train:
            loss.backward()
            opt.step()
            opt.zero_grad()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps, float(loss.detach())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu (the small models) or cuda (the full models)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"CPU {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s)")
    print(f"torch {torch.__version__}, {where}, {args.precision}")
    print("| model | input | pass | default s | channels-last s | default / channels-last | loss default / CL |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, name, overrides, shape in GPU_CASES if device.type == "cuda" else CASES:
        torch.manual_seed(0)
        plain = build_model(name, **overrides).to(device)
        fast = use_channels_last(copy.deepcopy(plain))
        x = torch.randn(*shape, device=device)
        y = (torch.rand(shape[0], plain.out_channels, *shape[2:], device=device) > 0.9).float()
        for train in (True, False):
            a, la = timed(copy.deepcopy(plain), x, y, args.steps, train, dtype)
            b, lb = timed(copy.deepcopy(fast), x, y, args.steps, train, dtype)
            print(f"| {label} | {'x'.join(map(str, shape))} | {'train step' if train else 'forward'} | {a:.3f} | "
                  f"{b:.3f} | {a / b:.2f}x | {la:.5f} / {lb:.5f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
