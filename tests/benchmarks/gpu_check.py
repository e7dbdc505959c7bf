"""The GPU check (`make gpu-check`): the inference and training-step benchmarks on one CUDA GPU, in one table.

    python tests/benchmarks/gpu_check.py [--quick] [--log FILE]

Runs, each as its own process (a failing part is reported, the others still run):
1. bench_inference.py --device cuda --precision bf16: whole-case 3D inference with the full `unet3d` (nnU-Net
   BraTS plan, 31M) at 128^3 windows, distseg vs MONAI, with and without mirror TTA;
2. bench_train.py --sections a,s: the bare DeepSpeed engine (1 rank, ZeRO 0) vs a plain torch autocast loop for
   `unet3d` at 2x4x128^3, with the phases (forward / backward / optimizer step) and the host syncs per micro-step;
3. bench_trainer_speed.py --model 3d: distseg's whole trainer (configs/brats_unet3d.yaml: real loader on a store of
   real-shaped cases, device augmentation, DeepSpeed at 1 rank) at ZeRO 0/2/3 and with each speed switch
   (channels-last, bf16.immediate_grad_update, torch.compile), against a plain torch loop in the same process:
   samples/s, x plain, data-wait fraction, peak memory;
4. bench_trainer_speed.py --model 2d: the same for the 65.8M `res_inception_unet` at 8x3x256^2, ZeRO 0/2/3;
5. bench_channels_last.py: channels-last vs the default layout, training step and forward, both full models;
6. bench_models.py --device cuda: forward+backward time and peak memory of every model at its training size.
Prints the GPU's name, torch/CUDA versions and every table. Without a CUDA GPU it says so and exits 0.
Budget: about 8 minutes on an H100 (`--quick` skips part 6; `--parts 3,4` runs those only).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _run(title: str, cmd: list[str], timeout: int, log) -> bool:
    log(f"\n## {title}\n$ {' '.join(cmd)}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        log(out[-4000:] + f"\nTIMED OUT after {timeout}s\n")
        return False
    table = [ln for ln in res.stdout.splitlines() if ln.strip()]
    log("\n".join(table[-40:]) + "\n")
    if res.returncode != 0:
        log(f"FAILED (exit {res.returncode}) after {time.perf_counter() - t0:.0f}s:\n{res.stderr[-4000:]}\n")
        return False
    log(f"({time.perf_counter() - t0:.0f}s)\n")
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="skip the per-model forward+backward table")
    p.add_argument("--log", type=Path, default=None, help="also append everything printed to this file")
    p.add_argument("--parts", default="1-6", help="parts to run, e.g. 3,4 or 1-5 (default: all)")
    args = p.parse_args()
    chosen: set[int] = set()
    for piece in args.parts.split(","):
        lo, _, hi = piece.partition("-")
        chosen.update(range(int(lo), int(hi or lo) + 1))

    def want(part: int) -> bool:
        return part in chosen

    def log(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        if args.log:
            with open(args.log, "a", encoding="utf-8") as f:
                f.write(text)

    import torch

    if not torch.cuda.is_available():
        log("gpu-check: no CUDA GPU visible to torch on this machine; nothing to measure (exit 0).\n")
        return 0
    props = torch.cuda.get_device_properties(0)
    log(f"# distseg GPU check\n{torch.cuda.get_device_name(0)}, {props.total_memory / 2**30:.0f} GiB, "
        f"{props.multi_processor_count} SMs; torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    py = sys.executable
    results = {}
    if want(1):
        results["inference"] = _run(
            "Whole-case 3D inference (bf16), distseg vs MONAI",
            [py, str(HERE / "bench_inference.py"), "--device", "cuda", "--precision", "bf16",
             "--features", "32,64,128,256,320,320", "--window", "128", "--window-batch", "4", "--repeats", "3"],
            timeout=240, log=log)
    if want(2):
        results["engine vs plain"] = _run(
            "Training step (bf16), bare DeepSpeed engine vs plain autocast loop, unet3d 2x4x128^3 ZeRO 0, host syncs",
            [py, str(HERE / "bench_train.py"), "--sections", "a,s", "--device", "cuda", "--precision", "bf16",
             "--step-model", "unet3d", "--step-overrides", '{"in_channels": 4}', "--step-batch", "2",
             "--step-size", "128", "--step-zero", "0", "--steps", "20", "--warmup", "3"],
            timeout=150, log=log)
    if want(3):
        results["trainer 3d"] = _run(
            "distseg trainer vs plain torch loop, unet3d 2x4x128^3 (configs/brats_unet3d.yaml), per speed switch",
            [py, str(HERE / "bench_trainer_speed.py"), "--device", "cuda", "--model", "3d",
             "--variants", "zero0,zero2,zero3,zero2 channels_last,zero0 immediate_grad_update,zero2 compile"],
            timeout=420, log=log)
    if want(4):
        results["trainer 2d"] = _run(
            "distseg trainer vs plain torch loop, res_inception_unet 8x3x256^2 (images2d_res_inception_unet.yaml)",
            [py, str(HERE / "bench_trainer_speed.py"), "--device", "cuda", "--model", "2d",
             "--variants", "zero0,zero2,zero3", "data.batch_size=8"],
            timeout=240, log=log)
    if want(5):
        results["channels_last"] = _run(
            "Channels-last convolutions vs the default layout (bf16): model.channels_last=auto is off on GPUs until "
            "this says otherwise",
            [py, str(HERE / "bench_channels_last.py"), "--device", "cuda", "--precision", "bf16", "--steps", "10"],
            timeout=150, log=log)
    if want(6) and not args.quick:
        results["models"] = _run("Forward+backward per model at training size (fp32/TF32)",
                                 [py, str(HERE / "bench_models.py"), "--device", "cuda", "--steps", "3"],
                                 timeout=240, log=log)
    log("\n## Parts\n" + "\n".join(f"- {k}: {'ok' if v else 'FAILED'}" for k, v in results.items()) + "\n")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
