"""Train a segmentation model with DeepSpeed (thin entry point; the loop lives in `distseg.trainer`).

    deepspeed [--num_gpus N | --hostfile H ...] launch/train.py --config configs/X.yaml [key=value ...]

Config errors, a missing or wrong-version store and an unresumable checkpoint stop every rank BEFORE distributed
init, with a message naming the key/path. Exit status: 0 done, 2 bad input, 3 stopped on non-finite losses.
"""

from __future__ import annotations

import argparse
import logging
import sys

from distseg import checkpoint, dist
from distseg.config import ConfigError, load_config
from distseg.data.loader import open_store
from distseg.data.store import StoreError
from distseg.engine import build_ds_config, check_accelerator_support
from distseg.trainer import NonFiniteLossError, Trainer, model_channels

logger = logging.getLogger("launch.train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
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
    args = parse_args(argv)
    rank, world_size = dist.env_rank(), dist.env_world_size()
    setup_logging(rank)
    # Everything that can be checked without the other ranks is checked here, so bad input fails fast and alike
    # on every rank instead of after a collective has started.
    try:
        cfg = load_config(args.config, args.overrides)
        model_channels(cfg, open_store(cfg.data))
        build_ds_config(cfg, world_size)
        check_accelerator_support(cfg)
        found = checkpoint.newest_complete(cfg.run_dir / "checkpoints")
        if found and cfg.checkpoint.resume == "auto":
            checkpoint.check_world_size(found[1], cfg.run_dir / "checkpoints" / found[0], world_size)
    except (ConfigError, StoreError, checkpoint.CheckpointError, ValueError) as e:
        logger.error("%s", e)
        return 2

    dist.set_cpu_threads()
    dist.init_distributed()
    trainer = Trainer(cfg)
    try:
        trainer.train()
    except NonFiniteLossError as e:
        logger.error("%s", e)
        return 3
    finally:
        trainer.close()
        dist.shutdown()
    logger.info("done: %d steps, run folder %s", trainer.state.step, cfg.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
