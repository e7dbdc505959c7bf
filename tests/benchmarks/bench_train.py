"""Training benchmark (run by hand; never part of the test suite). Prints one table with ratios vs baselines
measured in the same run.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 GLOO_SOCKET_IFNAME=lo .venv/bin/python tests/benchmarks/bench_train.py
    .venv/bin/python tests/benchmarks/bench_train.py --device cuda --quick      # GPU: (a) + (s) only, < 3 min

(a) step time: DeepSpeed engine (ZeRO 0, client AdamW, 1 process) vs a plain PyTorch loop on the same model,
    batch and optimizer; the two are stepped alternately in one process so load from other jobs hits both alike.
    `--device cuda` runs both on the GPU (nccl), `--precision bf16` (the default on CUDA) as DeepSpeed bf16 vs
    torch.autocast(bf16) for the plain loop. Target: ratio <= 1.10.
(s) host-device syncs per training micro-step (CUDA only): the trainer's step path (pinned batch copy, device
    augmentation, region targets, forward, loss, device-side loss sum, backward) run under
    torch.cuda.set_sync_debug_mode("warn"), counting the synchronising calls it reports per micro-step (the
    optimizer step is excluded: DeepSpeed's own gradient-norm check syncs once per step by design).
(b) model-state memory per rank (params + grads + optimizer states) for ZeRO 0/1/2/3 at 2 gloo ranks on the 65M
    `res_inception_unet`: counted as the bytes of every live tensor storage after one optimizer step (tiny input, so
    activations are freed and negligible), cross-checked against the analytic bytes/param and DeepSpeed's own
    estimators (which assume 16-bit mixed precision). Target: ZeRO 3 <= 0.6 x ZeRO 0.
(c) loader throughput: a hook that pulls rows from the data engineer's `tests/benchmarks/bench_data.py` when present.
(d) the demo config: loader supply vs model demand, and the data-wait fraction read back from a demo run's
    TensorBoard events (`make demo` first). Target: data wait < 5 % of step time.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from bench_train_memory import Row, bench_memory, free_port, set_dist_env


def bench_step_time(args: argparse.Namespace) -> list[Row]:
    import deepspeed

    from distseg.core import dist
    from distseg.losses import LossConfig, build_loss
    from distseg.models import build_model
    from distseg.train.engine import mixed_precision_batchnorm

    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    bf16 = args.precision == "bf16"
    overrides = json.loads(args.step_overrides)
    plain_model = build_model(args.step_model, **overrides).to(device)
    ds_model = copy.deepcopy(plain_model)
    n_params = sum(p.numel() for p in plain_model.parameters())
    loss_fn = build_loss(LossConfig())
    spatial = (args.step_size,) * plain_model.spatial_dims
    in_channels = plain_model.in_channels
    with torch.no_grad():
        out_ch = ds_model.eval()(torch.zeros(1, in_channels, *spatial, device=device)).shape[1]
    ds_model.train()
    x = torch.randn(args.step_batch, in_channels, *spatial, device=device)
    y = (torch.rand(args.step_batch, out_ch, *spatial, device=device) > 0.7).float()

    fused = {"fused": True} if args.fused else {}
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-4, **fused)
    set_dist_env(0, 1, free_port())
    if cuda:
        torch.cuda.set_device(0)
    dist.init_distributed()  # nccl on CUDA, gloo on CPU; skips and unlinks DeepSpeed's unused CPU shm op
    ds_config = {"train_micro_batch_size_per_gpu": args.step_batch, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": args.step_zero}, "steps_per_print": 10**9,
                 "wall_clock_breakdown": False, "bf16": {"enabled": bf16}}
    if bf16:
        mixed_precision_batchnorm(ds_model)  # what distseg.train.engine.initialize does: BatchNorm statistics stay fp32
    engine, *_ = deepspeed.initialize(model=ds_model, config=ds_config,
                                      optimizer=torch.optim.AdamW(ds_model.parameters(), lr=1e-4, **fused))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def plain_step() -> list[float]:
        # The plain baseline in bf16 is the usual torch AMP loop: fp32 weights, bf16 autocast compute.
        sync()
        t = [time.perf_counter()]
        plain_opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(plain_model(x), y)
        sync()
        t.append(time.perf_counter())
        loss.backward()
        sync()
        t.append(time.perf_counter())
        plain_opt.step()
        loss.item()  # the loop's one sync, same in both variants
        t.append(time.perf_counter())
        return [b - a for a, b in itertools.pairwise(t)]

    def ds_step() -> list[float]:
        sync()
        t = [time.perf_counter()]
        loss = loss_fn(engine(x.to(torch.bfloat16) if bf16 else x), y)
        sync()
        t.append(time.perf_counter())
        engine.backward(loss)  # includes DeepSpeed's gradient all-reduce (a no-op collective at 1 rank)
        sync()
        t.append(time.perf_counter())
        engine.step()  # optimizer step + zero_grad
        loss.item()
        t.append(time.perf_counter())
        return [b - a for a, b in itertools.pairwise(t)]

    for _ in range(args.warmup):
        plain_step()
        ds_step()
    plain_t, ds_t = [], []
    for i in range(args.steps):  # alternate the order so neither variant always runs first
        if i % 2:
            plain_t.append(plain_step())
            ds_t.append(ds_step())
        else:
            ds_t.append(ds_step())
            plain_t.append(plain_step())
    plain_tot, ds_tot = [sum(p) for p in plain_t], [sum(d) for d in ds_t]
    # Verdict on the median of per-pair ratios: the two steps of a pair run back to back, so load from other
    # processes on this shared machine hits both alike; ratio of medians and of minima are shown beside it.
    paired = statistics.median(d / p for d, p in zip(ds_tot, plain_tot, strict=True))
    case = (f"{args.step_model} {n_params / 1e6:.1f}M, batch {args.step_batch}x{in_channels}x"
            f"{args.step_size}^{len(spatial)}, {args.precision} {'fused ' if args.fused else ''}AdamW, "
            f"ZeRO {args.step_zero}, {args.device}, "
            f"{args.steps} paired steps")
    verdict = f"<= 1.10 {'ok' if paired <= 1.10 else 'MISSED'}"

    def phases(ts: list[list[float]]) -> str:
        return "/".join(f"{statistics.median(c) * 1e3:.0f}" for c in zip(*ts, strict=True)) + " ms"

    rows: list[Row] = [
        ("(a) step time", case, f"{statistics.median(ds_tot) * 1e3:.0f} ms DeepSpeed ZeRO {args.step_zero}",
         f"{statistics.median(plain_tot) * 1e3:.0f} ms plain loop", f"{paired:.3f} (paired median)", verdict),
        ("(a) step time", "ratio of medians / ratio of minima",
         f"min {min(ds_tot) * 1e3:.0f} ms", f"min {min(plain_tot) * 1e3:.0f} ms",
         f"{statistics.median(ds_tot) / statistics.median(plain_tot):.3f} / {min(ds_tot) / min(plain_tot):.3f}", ""),
        ("(a) phases", "median fwd+loss / backward / step", phases(ds_t), phases(plain_t), "", ""),
    ]
    # DeepSpeed's own extra work per step at 1 rank is the gradient all-reduce (flatten, collective, unflatten);
    # timed alone (grads present) it bounds the overhead independently of the noisy end-to-end ratio.
    if args.step_zero != 0:  # ZeRO >= 1 reduces inside backward; no separate all-reduce to time
        torch.distributed.destroy_process_group()
        return rows
    engine.backward(loss_fn(engine(x.to(torch.bfloat16) if bf16 else x), y))
    ar = []
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        engine.allreduce_gradients()
        sync()
        ar.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize()
    rows.append(("(a) DS-only work", "engine.allreduce_gradients() alone, min of 5", f"{min(ar) * 1e3:.1f} ms",
                 f"{min(plain_tot) * 1e3:.0f} ms plain step (min)", f"{min(ar) / min(plain_tot):.3f}", ""))
    torch.distributed.destroy_process_group()
    return rows


# ------------------------------------------------------------------------------------------- (s) host syncs
def bench_syncs(args: argparse.Namespace) -> list[Row]:
    """Synchronising calls per micro-step of the trainer's step path, counted by CUDA's sync debug mode."""
    if args.device != "cuda" or not torch.cuda.is_available():
        return [("(s) host syncs", "needs --device cuda (torch.cuda.set_sync_debug_mode)", "-", "-", "-", "skipped")]
    from distseg.data.augment import DeviceAugment
    from distseg.data.config import AugmentConfig
    from distseg.data.labels import BRATS_REGIONS
    from distseg.data.targets import labels_to_targets
    from distseg.losses import LossConfig, build_loss
    from distseg.models import build_model
    from distseg.train.engine import mixed_precision_batchnorm

    device = torch.device("cuda")
    patch, margin, batch = (args.sync_size,) * 3, 8, 2
    model = build_model("unet3d", "debug", in_channels=4, out_channels=3).to(device)
    mixed_precision_batchnorm(model)
    model = model.bfloat16()
    for b in model.buffers():  # DeepSpeed bf16 casts parameters only
        b.data = b.data.float() if b.is_floating_point() else b.data
    loss_fn = build_loss(LossConfig())
    # Every augmentation on, so each code path that could sync runs.
    augment = DeviceAugment(AugmentConfig(rotate_prob=1.0, scale_prob=0.5, gamma_prob=0.5, noise_prob=0.5), patch,
                            margin, seed=0, rank=0)
    size = tuple(p + 2 * margin for p in patch)
    loss_sum, loss_count = torch.zeros((), device=device), torch.zeros((), device=device)

    def micro_step(i: int) -> None:
        nonlocal loss_sum, loss_count
        host = {"image": torch.randn(batch, 4, *size).pin_memory(),
                "label": torch.randint(0, 4, (batch, *size), dtype=torch.uint8).pin_memory(),
                "sample_index": torch.arange(i * batch, (i + 1) * batch)}
        image = host["image"].to(device, non_blocking=True)
        label = host["label"].to(device, non_blocking=True)
        image, label = augment(image, label, host["sample_index"])
        targets = labels_to_targets(label, "regions", BRATS_REGIONS)
        loss = loss_fn(model(image.bfloat16()), targets)
        finite = torch.isfinite(loss)
        loss_sum = loss_sum + torch.where(finite, loss.detach().float(), 0.0)
        loss_count = loss_count + finite
        loss.backward()

    for i in range(2):  # warm-up: allocator, cuDNN autotuning and lazy initialisation may sync once
        micro_step(i)
    torch.cuda.synchronize()
    steps = 5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(2, 2 + steps):
                micro_step(i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
    return [("(s) host syncs", f"trainer micro-step path, unet3d debug bf16, batch {batch}, {args.sync_size}³ "
             f"+ margin {margin}, all augmentations on; {steps} micro-steps",
             f"{len(syncs) / steps:.1f} per micro-step", "-", "-", ", ".join(where)[:200] or "none")]


# ------------------------------------------------------------------------- (c) loader throughput (lead integrates)
def bench_loader(args: argparse.Namespace) -> list[Row]:
    """HOOK: rows from the data engineer's bench_data.py. If it defines `bench_rows(argv) -> list[tuple]` (6
    columns as here) they are appended; otherwise a placeholder row says what is missing."""
    path = Path(__file__).with_name("bench_data.py")
    if not path.exists():
        return [("(c) loader", "tests/benchmarks/bench_data.py not present", "-", "-", "-", "hook only")]
    spec = importlib.util.spec_from_file_location("bench_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "bench_rows"):
        return [("(c) loader", f"{path.name} has no bench_rows(argv); run it directly", "-", "-", "-", "hook only")]
    return [tuple(str(c) for c in row) for row in module.bench_rows(args.loader_args.split())]


def bench_demo_data_wait(args: argparse.Namespace) -> list[Row]:
    """(d) the demo config: what one rank's loader supplies vs what its model consumes, and the data-wait fraction.

    Supply: batches/s of the demo config's own train loader (rank 0 of 2, its `num_workers`), pulled with no model.
    Demand: 1 / median step time, and the median `perf/data_wait_fraction` (time blocked in `next(loader)` / step
    time), both read back from a finished demo run's TensorBoard events (`--demo-run`, default `demo_out/runs/demo`,
    written by `make demo`). Target: data wait < 5 % of step time."""
    from distseg.config import load_config
    from distseg.data.loader import build_train_loader
    from distseg.train.monitor import read_events

    run = Path(args.demo_run)
    tb = run / "tb"
    if not tb.is_dir():
        return [("(d) demo data wait", f"no TensorBoard run at {tb}; run `make demo` first", "-", "-", "-", "skipped")]
    cfg = load_config(run / "config.yaml", [])
    events = read_events(tb)
    step_s = statistics.median(v for _, v in events["perf/step_time_s"])
    wait = statistics.median(v for _, v in events["perf/data_wait_fraction"])
    loader = build_train_loader(cfg.data, rank=0, world_size=2, seed=cfg.run.seed)
    it = iter(loader)
    for _ in range(3):  # worker start-up and first reads
        next(it)
    t0 = time.perf_counter()
    for _ in range(args.demo_batches):
        next(it)
    supply = args.demo_batches / (time.perf_counter() - t0)
    demand = 1.0 / step_s
    workers = cfg.data.num_workers
    return [
        ("(d) demo data wait", f"loader batches/s, rank 0 of 2, {workers} worker(s), no model",
         f"{supply:.2f}", f"model consumes {demand:.2f}/s", f"{supply / demand:.1f}x", "supply > demand"),
        ("(d) demo data wait", f"median data-wait fraction of step time ({run.name} run, TB)",
         f"{wait:.1%}", f"step {step_s:.3f} s", "-", f"< 5% {'met' if wait < 0.05 else 'NOT met'}"),
    ]


def print_table(rows: list[Row]) -> str:
    header: Row = ("section", "case", "measured", "baseline", "ratio", "target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(6)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    text = "\n".join(lines)
    sys.stdout.write(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="a,s,b,c,d",
                   help="comma list of a (step time), s (host syncs, CUDA), b (memory), c (loader), d (demo data wait)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(a), (s): cpu or cuda")
    p.add_argument("--precision", choices=("fp32", "bf16"),
                   help="(a): bf16 = DeepSpeed bf16 vs a torch autocast loop; default bf16 on cuda, fp32 on cpu")
    p.add_argument("--quick", action="store_true",
                   help="only (a) with 10 paired steps and (s): the GPU check (< 3 min on one GPU)")
    p.add_argument("--sync-size", type=int, default=64, help="(s): 3D patch edge")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--in-channels", type=int, default=3, help="(b): input channels of the memory model")
    p.add_argument("--step-zero", type=int, default=0, help="(a): ZeRO stage of the DeepSpeed side (1 rank)")
    p.add_argument("--fused", action="store_true", help="(a): torch's fused AdamW on both sides (CUDA)")
    p.add_argument("--step-model", default="unet")
    p.add_argument("--step-overrides", default='{"features": [32, 64, 128, 256, 512], "in_channels": 3}',
                   help="JSON build_model kwargs")
    p.add_argument("--step-batch", type=int, default=8)
    p.add_argument("--step-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mem-model", default="res_inception_unet")
    p.add_argument("--mem-size", type=int, default=64)
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--bucket", type=float, default=1e7, help="ZeRO reduce/allgather/prefetch bucket size (elements)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--loader-args", default="", help="argv passed to bench_data.bench_rows")
    p.add_argument("--demo-run", default="demo_out/runs/demo", help="(d): a finished demo run folder")
    p.add_argument("--demo-batches", type=int, default=30, help="(d): batches pulled from the demo loader")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    if args.quick:
        args.sections, args.steps = "a,s", min(args.steps, 10)
    sections = set(args.sections.split(","))
    rows: list[Row] = []
    if "a" in sections:
        rows += bench_step_time(args)
    if "s" in sections:
        rows += bench_syncs(args)
    if "b" in sections:
        rows += bench_memory(args)
    if "c" in sections:
        rows += bench_loader(args)
    if "d" in sections:
        rows += bench_demo_data_wait(args)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
