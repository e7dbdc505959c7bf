"""distseg's trainer on one device, per speed setting, against a plain torch loop measured in the same process.

    python tests/benchmarks/bench_trainer_speed.py --device cuda --model 3d          (from `make gpu-check`)
    python tests/benchmarks/bench_trainer_speed.py --device cuda --model 2d
    python tests/benchmarks/bench_trainer_speed.py --smoke              (CPU: tiny sizes, checks the script)

The trainer side is the real thing: `distseg.train.trainer.Trainer` built from a shipped config
(`configs/brats_unet3d.yaml`: unet3d 31M, 2x4x128^3; `configs/images2d_res_inception_unet.yaml`: 65.8M, 8x3x256^2),
its loader processes reading patches from a store of real-shaped cases (synthetic BraTS volumes of 240x240x155
written by the real preprocessing, or `--store`), device augmentation, region targets, the DeepSpeed engine at
one rank, the loss sum and the per-step stop flag. Each variant is one Trainer in this process (one process group),
`train.steps = warm-up + timed steps`, validation off. Timed: the wall time between the TensorBoard log events at
the end of warm-up and at the last step (each log step syncs the device), so compilation and cuDNN tuning in the
warm-up steps are excluded and reported apart ("first steps s").

The plain loop: the same model (and memory format), batch, loss and optimizer (fused on CUDA) on device-resident
random tensors, autocast to the run's precision; nothing else. "x plain" = trainer step time / plain step time
(the issue's target: <= 1.05 at one rank); compiled variants are also compared with a compiled plain loop.

Columns: samples/s, ms per step, x plain, data wait (the trainer's perf/data_wait_fraction after warm-up: the
share of step time spent waiting for the loader), peak device memory (GiB), first steps s (warm-up wall time).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

CONFIGS = {"3d": "configs/brats_unet3d.yaml", "2d": "configs/images2d_res_inception_unet.yaml"}
IMMEDIATE = "immediate_grad_update"
"""DeepSpeed's `bf16.immediate_grad_update`: read only by its BF16_Optimizer, i.e. bf16 at ZeRO 0 (DeepSpeed 0.19.8);
the GPU step's 16-66 ms of optimizer bookkeeping (docs/gpu.md) was measured there."""
VARIANTS = {  # name -> config overrides (IMMEDIATE: a preset with bf16.immediate_grad_update, written at run time)
    "zero0": ["deepspeed.zero_stage=0"],
    "zero2": ["deepspeed.zero_stage=2"],
    "zero3": ["deepspeed.zero_stage=3"],
    "zero2 cudnn_benchmark=false": ["deepspeed.zero_stage=2", "train.cudnn_benchmark=false"],
    "zero2 fused=false": ["deepspeed.zero_stage=2", "optim.fused=false"],
    "zero2 channels_last": ["deepspeed.zero_stage=2", "model.channels_last=true"],
    "zero0 immediate_grad_update": ["deepspeed.zero_stage=0", IMMEDIATE],
    "zero2 compile": ["deepspeed.zero_stage=2", "model.compile=true"],
    "zero2 compile channels_last": ["deepspeed.zero_stage=2", "model.compile=true", "model.channels_last=true"],
}
DEFAULT_VARIANTS = {
    "3d": ["zero0", "zero2", "zero3", "zero2 cudnn_benchmark=false", "zero2 channels_last",
           "zero0 immediate_grad_update", "zero2 compile", "zero2 compile channels_last"],
    "2d": ["zero0", "zero2", "zero3", "zero2 channels_last", "zero2 compile"],
}


def _preprocess(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    res = subprocess.run([sys.executable, "-m", "preprocess", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    if res.returncode != 0:
        raise SystemExit(f"preprocess {' '.join(args)} failed:\n{res.stderr[-3000:]}")


def make_store(kind: str, root: Path, cases: int, shape: str) -> Path:
    """A store of synthetic cases written by the real preprocessing (BraTS NIfTI or 2D PNG folders)."""
    src = root / f"src_{kind}"
    synth = "brats" if kind == "3d" else "images2d"
    _preprocess("synth", "--kind", synth, "--n", str(cases), "--dst", str(src), "--shape", shape)
    _preprocess(synth, "--src", str(src), "--dst", str(root), "--name", synth, "--serial", "--folds", "2")
    return root / f"{synth}.zarr"


def _preset_with_immediate_update(base: str, folder: Path) -> str:
    from distseg.config_files import resolve_preset

    preset = json.loads(resolve_preset(base).read_text(encoding="utf-8")) if base else {}
    preset.setdefault("bf16", {"enabled": "auto"})[IMMEDIATE] = True
    path = folder / "preset_immediate_grad_update.json"
    path.write_text(json.dumps(preset), encoding="utf-8")
    return str(path)


def run_trainer(config: str, overrides: list[str], device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """One Trainer run; the timed window's figures from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distseg.config import load_config
    from distseg.train.trainer import Trainer

    cfg = load_config(config, overrides)
    device_is_cuda = device.type == "cuda"
    if device_is_cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
        engine = trainer.engine
        del trainer
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine
        gc.collect()
        torch._dynamo.reset()
        if device_is_cuda:
            peak = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.empty_cache()
    acc = EventAccumulator(str(cfg.run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    loss = {e.step: e for e in acc.Scalars("train/loss")}
    start, end = loss[warmup], loss[warmup + steps]
    seconds = (end.wall_time - start.wall_time) / steps
    wait = [e.value for e in acc.Scalars("perf/data_wait_fraction") if e.step > warmup]
    return {
        "step_s": seconds,
        "samples_per_s": cfg.data.batch_size / seconds,
        "data_wait": sum(wait) / len(wait),
        "peak_gib": peak if device_is_cuda else float("nan"),
        "first_s": start.wall_time - t0,
        "loss": end.value,
    }


def run_plain(config: str, overrides: list[str], device: torch.device, warmup: int, steps: int,
              compile_model: bool) -> dict[str, float]:
    """The plain loop: model, loss and AdamW on device-resident random batches; nothing else."""
    from distseg.config import load_config
    from distseg.data.loader import open_store
    from distseg.losses import build_loss
    from distseg.models import build_model
    from distseg.models.memory_format import channels_last_wanted, use_channels_last
    from distseg.train.engine import resolve_precision
    from distseg.train.optim import build_optimizer, param_groups
    from distseg.train.setup import model_channels

    cfg = resolve_precision(load_config(config, overrides))
    store = open_store(cfg.data)
    c_in, c_out = model_channels(cfg, store)
    torch.manual_seed(0)
    model = build_model(cfg.model.name, cfg.model.preset, **{**cfg.model.overrides, "in_channels": c_in,
                                                              "out_channels": c_out}).to(device)
    if channels_last_wanted(cfg.model.channels_last, cfg.data.spatial_dims, device.type):
        use_channels_last(model)  # as the trainer resolves model.channels_last
    if compile_model:
        model.compile(dynamic=False)
    cuda = device.type == "cuda"
    opt = build_optimizer(cfg.optim, param_groups(model, cfg.optim.weight_decay), fused=cuda)  # as the trainer's
    loss_fn = build_loss(cfg.loss)
    b, p = cfg.data.batch_size, tuple(cfg.data.patch_size)
    x = torch.randn(b, c_in, *p, device=device)
    y = (torch.rand(b, c_out, *p, device=device) > 0.9).float()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t1) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    model = opt = x = y = None  # free the device memory before the next run
    gc.collect()
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
    return {"step_s": seconds, "samples_per_s": b / seconds, "data_wait": float("nan"), "peak_gib": peak,
            "first_s": t1 - t0, "loss": float("nan")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(CONFIGS), default="3d")
    p.add_argument("--config", default=None, help="another experiment config of the same kind (default: --model's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default=None, help=f"comma-separated names out of {list(VARIANTS)}")
    p.add_argument("--warmup", type=int, default=10, help="steps before the timed window (compilation, tuning)")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--store", type=Path, default=None, help="a store to read (default: synthetic real-shaped cases)")
    p.add_argument("--cases", type=int, default=3, help="synthetic cases (3D) / images x 8 (2D)")
    p.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the config's)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the script: tiny models and patches, 2 warm-up + 2 timed steps")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every trainer run and the plain loop")
    args = p.parse_args(argv)
    logging_setup()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_trainer_speed: no CUDA GPU visible; use --device cpu")
        return 0
    if args.smoke:
        args.warmup, args.steps = 2, 2
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    from distseg.core import dist

    work = Path(tempfile.mkdtemp(prefix="bench_trainer_speed_"))
    store = args.store
    if store is None:
        shape = ("48x48x32" if args.smoke else "240x240x155") if args.model == "3d" else ("64x64" if args.smoke
                                                                                          else "256x256")
        t = time.perf_counter()
        store = make_store(args.model, work, args.cases if args.model == "3d" else 8 * args.cases, shape)
        print(f"store {store} ({shape}) written in {time.perf_counter() - t:.0f}s", flush=True)
    config = args.config or CONFIGS[args.model]
    if args.threads:
        torch.set_num_threads(args.threads)
    common = [f"data.store={store}", f"run.output_root={work}", f"train.steps={args.warmup + args.steps}",
              "train.val_every=0", "checkpoint.every=0", "train.max_minutes=null", "monitor.image_every=0",
              f"monitor.log_every={math.gcd(args.warmup, args.steps)}", "data.val_folds=[]",
              *([f"data.num_workers={args.workers}"] if args.workers is not None else [])]
    if args.smoke:
        common += ["model.preset=debug", "deepspeed.precision=auto", "data.num_workers=1",
                   "data.patch_size=" + ("[32,32,32]" if args.model == "3d" else "[64,64]"), "data.batch_size=2"]
    common += args.overrides
    dist.init_distributed()
    device = dist.device()
    names = args.variants.split(",") if args.variants else DEFAULT_VARIANTS[args.model]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; expected names out of {list(VARIANTS)}")
    rows: list[tuple[str, dict[str, float]]] = []
    plain = run_plain(config, common, device, args.warmup, args.steps, compile_model=False)
    rows.append(("plain torch loop", plain))
    plain_compiled = None
    if any("compile" in n for n in names):
        plain_compiled = run_plain(config, common, device, args.warmup, args.steps, compile_model=True)
        rows.append(("plain torch loop, compiled", plain_compiled))
    preset_base = None
    failed: list[str] = []
    for i, name in enumerate(names):
        extra = list(VARIANTS[name])
        if IMMEDIATE in extra:
            from distseg.config import load_config

            preset_base = preset_base or load_config(config, common).deepspeed.preset
            extra = [e for e in extra if e != IMMEDIATE] + [
                f"deepspeed.preset={_preset_with_immediate_update(preset_base, work)}"]
        print(f"-- {name}", flush=True)
        try:
            rows.append((f"trainer {name}", run_trainer(config, [*common, f"run.name=v{i}", *extra], device,
                                                        args.warmup, args.steps)))
        except Exception as e:  # one failing switch must not hide the others' figures (one GPU call per session)
            print(f"trainer {name} FAILED: {type(e).__name__}: {e}", flush=True)
            failed.append(name)
            rows.append((f"trainer {name}: FAILED ({type(e).__name__})", {}))
    print_table(rows, plain, plain_compiled, args, device)
    if failed:
        print(f"failed variants: {failed}")
    dist.shutdown()
    return 1 if failed else 0


def logging_setup() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def print_table(rows, plain, plain_compiled, args, device) -> None:
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"\n# trainer speed: {args.config or CONFIGS[args.model]} on {name}, {args.warmup} warm-up + "
          f"{args.steps} timed steps, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print("| run | samples/s | ms/step | x plain | x plain compiled | data wait | peak GiB | first steps s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, r in rows:
        if not r:
            print(f"| {label} | | | | | | | |")
            continue
        vs_c = f"{r['step_s'] / plain_compiled['step_s']:.3f}" if plain_compiled and "compile" in label else ""
        wait = "" if r["data_wait"] != r["data_wait"] else f"{100 * r['data_wait']:.1f} %"
        peak = "" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.2f}"
        print(f"| {label} | {r['samples_per_s']:.2f} | {1e3 * r['step_s']:.1f} | {r['step_s'] / plain['step_s']:.3f} "
              f"| {vs_c} | {wait} | {peak} | {r['first_s']:.1f} |")


if __name__ == "__main__":
    raise SystemExit(main())
