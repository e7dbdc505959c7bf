"""Test harness (run by tests/train/test_fault.py through the real launcher): start a Trainer exactly as
launch/train.py does, which resumes the run, save what it loaded into ``<run>/probe/`` right away, then train on.

    deepspeed --num_gpus 3 tests/train/resave_probe.py --config C k=v ...

Comparing ``<run>/probe/<tag>`` with the checkpoint it resumed from shows whether an elastic resume loaded every
weight and optimizer moment exactly (both consolidated with DeepSpeed's universal converter).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict

from distseg.config import load_config
from distseg.core import checkpoint, dist
from distseg.train.trainer import Trainer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    rank = dist.env_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    dist.set_cpu_threads()
    dist.init_distributed(cfg.dist.timeout_s)
    trainer = Trainer(cfg)
    state = {"counters": asdict(trainer.state), "config": {}, "val_dice": None}
    checkpoint.save(trainer.engine, cfg.run_dir / "probe", trainer.state.step, state, keep_last=1, keep_best=False)
    trainer.train()
    trainer.close()
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
