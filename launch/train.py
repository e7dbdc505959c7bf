"""Train a segmentation model with DeepSpeed (thin entry point; the loop lives in `distseg.train.trainer`).

    deepspeed [--num_gpus N | --hostfile H ...] launch/train.py --config configs/X.yaml [key=value ...]  (checkout)
    deepspeed [--num_gpus N | --hostfile H ...] $(which distseg-train) --config X [key=value ...]       (installed)
    deepspeed [--num_gpus N ...] --module launch.train --config X [key=value ...]                      (either)

`--config` takes a YAML path or the name of a shipped config (`distseg.config_files`). Config errors, a missing or
wrong-version store and an unresumable checkpoint stop every rank BEFORE distributed init, with a message naming
the key/path. Exit status (`distseg.core.exit_codes`): 0 done, 2 bad input, 4 stopped by SIGTERM/SIGUSR1 after
saving a checkpoint (requeue / rerun to resume; `distseg.train.preemption`), 5 another rank died or hung (rerun to
resume; `distseg.train.lost_rank`), 6 stopped on non-finite losses.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from distseg.config import ConfigError, load_config
from distseg.core import checkpoint, dist, exit_codes
from distseg.data.layout import StoreError
from distseg.data.loader import open_store
from distseg.train import elastic
from distseg.train.engine import build_ds_config, check_accelerator_support, resolve_precision
from distseg.train.lost_rank import EXIT_LOST_RANK, LostRankError
from distseg.train.preemption import EXIT_REQUEUE, StopRequest
from distseg.train.setup import model_channels
from distseg.train.state import NonFiniteLossError
from distseg.train.trainer import Trainer

logger = logging.getLogger("launch.train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="experiment YAML, or a shipped config's name (brats_budget, debug, ...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 data.patch_size=[64,64,64]")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher (unused)")
    return parser.parse_args(argv)


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    stop = StopRequest().install()  # first thing: a stop signal during start-up must not be lost
    try:
        return run(stop, argv)
    finally:
        stop.restore()  # a caller in the same process (tests, a notebook) gets its own handlers back


def run(stop: StopRequest, argv: list[str] | None) -> int:
    """Check, build and train (see the module docstring); `stop` carries the signal handlers `main` installed."""
    args = parse_args(argv)
    rank, world_size = dist.env_rank(), dist.env_world_size()
    setup_logging(rank)
    # Everything that can be checked without the other ranks is checked here, so bad input fails fast and alike
    # on every rank instead of after a collective has started.
    try:
        asked = load_config(args.config, args.overrides)
        cfg = resolve_precision(asked)
        if asked.deepspeed.precision == "auto":
            logger.info("deepspeed.precision auto -> %s (what this accelerator runs natively)", cfg.deepspeed.precision)
        model_channels(cfg, open_store(cfg.data))
        build_ds_config(cfg, world_size)
        check_accelerator_support(cfg)
        elastic.precheck(cfg, world_size)
    except (ConfigError, StoreError, checkpoint.CheckpointError, ValueError) as e:
        logger.error("%s", e)
        return exit_codes.USAGE

    dist.set_cpu_threads()
    dist.init_distributed(cfg.dist.timeout_s)
    try:
        trainer = Trainer(cfg, stop)
    except checkpoint.CheckpointError as e:  # rank 0's resume plan, shared by every rank
        logger.error("%s", e)
        dist.shutdown()
        return exit_codes.USAGE
    try:
        trainer.train()
    except NonFiniteLossError as e:
        logger.error("%s", e)
        return exit_codes.DIVERGED
    except LostRankError:  # already logged with the lost ranks and the step
        trainer.close()
        # Leave at once: tearing down a process group whose peer is gone can block (NCCL) or abort.
        logging.shutdown()
        os._exit(EXIT_LOST_RANK)
    finally:
        trainer.close()
        dist.shutdown()
    if trainer.stopped:
        logger.warning("stopped at step %d by %s; exit %d = requeue / rerun the same command to resume",
                       trainer.state.step, "a signal", EXIT_REQUEUE)
        return EXIT_REQUEUE
    logger.info("done: %d steps, run folder %s", trainer.state.step, cfg.run_dir)
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
