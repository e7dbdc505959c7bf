"""Test harness (run by tests/train/test_checkpoint.py as a subprocess): a real one-rank DeepSpeed engine (ZeRO 1,
so there are model and optimizer files) resumes from the newest complete checkpoint in CKPT_DIR, then trains one
step and saves through `checkpoint.save` at each of STEPS. With ``--kill-before-marker S`` the process SIGKILLs
itself during the save of step S after every file of the tag was written and fsynced, just before COMPLETE.json:
the worst moment for a crash.

    python tests/train/ckpt_kill_probe.py CKPT_DIR STEP [STEP ...] [--kill-before-marker S]

Prints ``resumed <tag>`` (or ``fresh``) and ``saved <tag>`` lines.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

from distseg.core import checkpoint, dist


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt_dir", type=Path)
    parser.add_argument("steps", type=int, nargs="+")
    parser.add_argument("--kill-before-marker", type=int, default=-1)
    args = parser.parse_args()
    import deepspeed

    dist.init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    config = {"train_batch_size": 1, "zero_optimization": {"stage": 1}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.Adam(model.parameters()), config=config)
    newest = checkpoint.newest_complete(args.ckpt_dir)
    if newest is not None:
        checkpoint.load(engine, args.ckpt_dir, newest[0])
    sys.stdout.write(f"resumed {newest[0]}\n" if newest else "fresh\n")
    for step in args.steps:
        loss = engine(torch.ones(1, 4)).sum()
        engine.backward(loss)
        engine.step()
        if step == args.kill_before_marker:
            checkpoint.mark_complete = lambda *_: os.kill(os.getpid(), signal.SIGKILL)  # fault injection
        tag = checkpoint.save(engine, args.ckpt_dir, step, {"counters": {"step": step}}, keep_last=2,
                              keep_best=False)
        sys.stdout.write(f"saved {tag}\n")
        sys.stdout.flush()
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
