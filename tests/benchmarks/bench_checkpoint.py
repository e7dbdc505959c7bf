"""Checkpoint cost (run by hand; never part of the test suite): how long a save stalls training, and a resume.

    GLOO_SOCKET_IFNAME=lo python tests/benchmarks/bench_checkpoint.py [--device cpu|cuda] [--world 2]

For the 65M `res_inception_unet` and `unet3d` (default presets, bf16) at ZeRO 2 and 3, each of `--world` ranks
builds the real engine (`distseg.train.engine`), takes one optimizer step (so the Adam moments exist), then times:

* save: `distseg.core.checkpoint.save` (DeepSpeed's save_checkpoint on every rank + RNG + trainer state + the
  COMPLETE.json marker after a barrier), the slowest rank, median of `--repeats`;
* resume: `distseg.core.checkpoint.load` into a freshly built engine;
* baselines in the same run: plain `torch.save` / `torch.load` of the same state each rank holds (its module
  state dict and its optimizer partition), so the ratio is DeepSpeed's and the marker's overhead over serialising.

The save is synchronous: a step boundary waits for every byte (see .notes/fault.md for why DeepSpeed 0.19.8's
decoupled writer is not used). The preemption grace period must cover one step plus one save.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

MODELS = {"res_inception_unet": (2, 128), "unet3d": (3, 64)}  # spatial dims, input size of the one step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _engine(name: str, cfg, world: int):
    from distseg.models import build_model
    from distseg.train.engine import build_ds_config, initialize

    torch.manual_seed(0)
    model = build_model(name, "default", in_channels=4, out_channels=3)
    return initialize(model, cfg, build_ds_config(cfg, world))


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, result_path: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from distseg.config import EngineConfig, ExperimentConfig, ModelConfig
    from distseg.core import checkpoint, dist

    dist.set_cpu_threads()
    dist.init_distributed(600)
    device = dist.device()
    results = []
    root = Path(args.dir)
    for name in args.models:  # one model and stage per spawn (see main): keeps peak host memory to one engine
        dims, size = MODELS[name]
        for stage in args.stages:
            cfg = ExperimentConfig()
            cfg = replace(cfg, model=ModelConfig(name=name, preset="default"),
                          deepspeed=EngineConfig(zero_stage=stage, precision="bf16"))
            eng = _engine(name, cfg, world)
            x = torch.randn(1, 4, *([size] * dims), device=device, dtype=torch.bfloat16)
            logits = eng(x)
            logits = logits[0] if isinstance(logits, list) else logits
            eng.backward(logits.float().mean())
            eng.step()
            params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in eng.module.parameters())
            ckpt = root / f"{name}_z{stage}"
            saves, plain_saves = [], []
            for k in range(args.repeats):
                t0 = time.perf_counter()
                checkpoint.save(eng, ckpt, k + 1, {"counters": {}, "config": {}, "val_dice": None}, keep_last=1,
                                keep_best=False)
                saves.append(time.perf_counter() - t0)
                plain = root / f"plain_{name}_z{stage}_rank{rank}.pt"
                dist.barrier()
                t0 = time.perf_counter()
                torch.save({"module": eng.module.state_dict(), "optimizer": eng.optimizer.state_dict()}, plain)
                plain_saves.append(time.perf_counter() - t0)
            tag = checkpoint.tag_for(args.repeats)
            ckpt_bytes = _bytes(ckpt / tag)
            del eng
            eng = _engine(name, cfg, world)
            dist.barrier()
            t0 = time.perf_counter()
            checkpoint.load(eng, ckpt, tag)
            load_s = time.perf_counter() - t0
            dist.barrier()
            t0 = time.perf_counter()
            torch.load(plain, map_location="cpu", weights_only=False)
            plain_load_s = time.perf_counter() - t0
            # the slowest rank is what a step boundary waits for
            timing = torch.tensor([statistics.median(saves), statistics.median(plain_saves), load_s, plain_load_s],
                                  dtype=torch.float64)
            dist.all_reduce_max(timing)
            results.append({"model": name, "stage": stage, "params": params, "bytes": ckpt_bytes,
                            "save_s": timing[0].item(), "torch_save_s": timing[1].item(),
                            "load_s": timing[2].item(), "torch_load_s": timing[3].item()})
            del eng
            dist.barrier()
            if rank == 0:
                shutil.rmtree(ckpt, ignore_errors=True)
    if rank == 0:
        Path(result_path).write_text(json.dumps(results))
    dist.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--world", type=int, default=2, help="ranks (on cuda: at most the GPUs present)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="", help="where to write the checkpoints (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    tmp = tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir or None)
    args.dir = tmp
    rows = []
    try:
        for name in args.models:
            for stage in args.stages:
                one = argparse.Namespace(**{**vars(args), "models": [name], "stages": [stage]})
                out = Path(tmp) / f"results_{name}_{stage}.json"
                torch.multiprocessing.spawn(_worker, args=(args.world, _free_port(), one, str(out)), nprocs=args.world)
                rows += json.loads(out.read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"checkpoint cost, {args.world} rank(s) on {args.device}, bf16, median of {args.repeats} saves "
          "(slowest rank)")
    print("| model | ZeRO | params | checkpoint | save | torch.save | ratio | resume | torch.load | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['stage']} | {r['params'] / 1e6:.1f}M | {r['bytes'] / 2**20:.0f} MiB | "
              f"{r['save_s']:.2f} s | {r['torch_save_s']:.2f} s | {r['save_s'] / r['torch_save_s']:.2f}x | "
              f"{r['load_s']:.2f} s | {r['torch_load_s']:.2f} s | {r['load_s'] / r['torch_load_s']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
