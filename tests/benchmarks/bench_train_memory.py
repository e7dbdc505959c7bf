"""Section (b) of `bench_train.py`: model-state memory per rank for ZeRO 0/1/2/3 at 2 gloo ranks (run through
`bench_train.py --sections b`; see its docstring), and the small helpers both files use."""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

Row = tuple[str, str, str, str, str, str]  # section, case, measured, baseline, ratio, target/verdict


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_dist_env(rank: int, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")


# ------------------------------------------------------------------------------------------------ (a) step time


# ------------------------------------------------------------------------------------------- (b) ZeRO memory
def _live_tensor_bytes() -> int:
    """Bytes of every distinct live tensor storage in this process (deduplicated by data pointer)."""
    gc.collect()
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance() on deprecated torch.distributed shims warns
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objects:
        if obj.device.type != "meta":
            storage = obj.untyped_storage()
            if storage.nbytes():
                seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def _memory_worker(rank: int, world_size: int, port: int, stage: int, dtype: str, args_json: str, out: str) -> None:
    import deepspeed

    from distseg.core import dist
    from distseg.losses import LossConfig, build_loss
    from distseg.models import build_model
    from distseg.train.monitor import memory_stats

    args = json.loads(args_json)
    torch.set_num_threads(1)
    set_dist_env(rank, world_size, port)
    dist.init_distributed()  # gloo; skips and unlinks DeepSpeed's unused CPU shm op (no JIT build, no leak)
    baseline = _live_tensor_bytes()
    rss0 = memory_stats("cpu")["memory/host_rss_mib"]
    torch.manual_seed(0)
    model = build_model(args["mem_model"])
    if dtype == "bf16":
        from distseg.train.engine import mixed_precision_batchnorm

        mixed_precision_batchnorm(model)  # as distseg.train.engine.initialize: BatchNorm statistics stay fp32
    n_params = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    bucket = int(args["bucket"])
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
        # Explicit bucket sizes: DeepSpeed's 5e8-element defaults would add a 1.9 GiB (fp32) communication buffer
        # per rank to ZeRO 3, larger than the 65M model's states themselves.
        "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                              "stage3_prefetch_bucket_size": bucket},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bf16"},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                      config=config)
    del model
    x = torch.randn(1, args["in_channels"], args["mem_size"], args["mem_size"])
    if dtype == "bf16":
        x = x.bfloat16()
    loss_fn = build_loss(LossConfig())
    # Measured inside the 2nd step, just before the inner AdamW updates: params, gradients in the dtype the
    # optimizer consumes, master weights and (already created) optimizer states are all resident then; that is
    # the model-state peak. The input (a few KiB) and freed activations are not counted.
    base = engine.optimizer
    while isinstance(getattr(base, "optimizer", None), torch.optim.Optimizer):
        base = base.optimizer
    peak = {"live": 0, "armed": False}

    def measure(*_: Any) -> None:
        if peak["armed"]:
            peak["live"] = max(peak["live"], _live_tensor_bytes() - baseline - x.untyped_storage().nbytes())

    base.register_step_pre_hook(measure)
    for it in range(2):
        peak["armed"] = it == 1
        logits = engine(x)
        loss = loss_fn(logits, torch.zeros(logits.shape, dtype=torch.float32))
        engine.backward(loss)
        del logits, loss
        engine.step()
    live = peak["live"]
    result = {"rank": rank, "n_params": n_params, "largest": largest,
              "live_bytes": live,
              "rss_delta_mib": memory_stats("cpu")["memory/host_rss_mib"] - rss0}
    Path(out, f"{stage}_{dtype}_{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _expected_bytes_per_param(stage: int, dtype: str, n: int) -> float:
    """Analytic model-state bytes/param per rank at the inner optimizer step (client AdamW: 8 B/param of states).

    fp32: ZeRO 0 = param + grad + states (16). ZeRO 1 and 2 (DeepSpeed >= 0.10 reduces stage-1 gradients into
    partitions during backward too) = full fp32 params + an fp32 master copy, gradient and states of the rank's
    partition (DeepSpeed clones the master even for an fp32 model): 4 + 16/n. ZeRO 3 partitions the params too and,
    at step time, holds the gradient partition twice (its reduce buffer and the flattened copy handed to the
    optimizer): 24/n.
    bf16: ZeRO 0 = bf16 param + grad + fp32 master + grad + states = 20; ZeRO 1/2 = 2 + 16/n (the bf16 gradient
    partition is freed once cast; DeepSpeed's estimator counts it: 2 + 18/n); ZeRO 3 = 20/n.
    """
    if dtype == "fp32":
        return {0: 16, 1: 4 + 16 / n, 2: 4 + 16 / n, 3: 24 / n}[stage]
    return {0: 20, 1: 2 + 16 / n, 2: 2 + 16 / n, 3: 20 / n}[stage]


def bench_memory(args: argparse.Namespace) -> list[Row]:
    import torch.multiprocessing as mp
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    world = 2
    args_json = json.dumps({"mem_model": args.mem_model, "mem_size": args.mem_size, "in_channels": args.in_channels,
                            "bucket": args.bucket})
    rows: list[Row] = []
    mib = 1024.0**2
    for dtype in args.dtypes.split(","):
        results: dict[int, dict[str, Any]] = {}
        for stage in (int(s) for s in args.stages.split(",")):
            with tempfile.TemporaryDirectory() as out:
                mp.spawn(_memory_worker, args=(world, free_port(), stage, dtype, args_json, out), nprocs=world,
                         join=True)
                per_rank = [json.loads(Path(out, f"{stage}_{dtype}_{r}.json").read_text()) for r in range(world)]
            results[stage] = max(per_rank, key=lambda r: r["live_bytes"])  # the fullest rank bounds the job
        base = results.get(0)
        for stage, r in results.items():
            n = r["n_params"]
            expected = _expected_bytes_per_param(stage, dtype, world) * n
            measured = r["live_bytes"]
            ratio = f"{measured / base['live_bytes']:.3f}" if base else "n/a"
            target = ""
            if stage == 3 and base:
                target = f"<= 0.60 {'ok' if measured / base['live_bytes'] <= 0.60 else 'MISSED'}"
            rows.append((f"(b) ZeRO {stage} {dtype}",
                         f"{args.mem_model} {n / 1e6:.1f}M, {world} ranks, max over ranks",
                         f"{measured / mib:.0f} MiB live ({measured / n:.1f} B/param; RSS +{r['rss_delta_mib']:.0f})",
                         f"analytic {expected / mib:.0f} MiB" + (f", ZeRO 0 {base['live_bytes'] / mib:.0f}" if base
                                                                 else ""),
                         ratio, target))
        if dtype == "bf16" and results:
            n, largest = next(iter(results.values()))["n_params"], next(iter(results.values()))["largest"]
            _, z2 = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=world, cpu_offload=False)
            _, z3, _ = estimate_zero3_model_states_mem_needs(n, largest, num_gpus_per_node=world, cpu_offload=False)
            for stage, est in ((2, z2), (3, z3)):
                if stage in results:
                    rows.append((f"(b) ZeRO {stage} bf16 xcheck", "DeepSpeed estimator (16-bit mixed precision)",
                                 f"{results[stage]['live_bytes'] / mib:.0f} MiB live", f"{est / mib:.0f} MiB estimate",
                                 f"{results[stage]['live_bytes'] / est:.3f}", ""))
    return rows
