"""Start-up pieces of a training run: the model's channels from the store, and the model built with identical
initial weights on every rank."""

from __future__ import annotations

import logging

import torch

from distseg.config import ConfigError, ExperimentConfig
from distseg.core import dist
from distseg.data.store import Store
from distseg.data.targets import num_targets
from distseg.models import build_model
from distseg.models.memory_format import channels_last_wanted, use_channels_last

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""`deepspeed.precision` -> the dtype the engine's inputs are cast to."""


def model_channels(cfg: ExperimentConfig, store: Store) -> tuple[int, int]:
    """(in, out) channels the store implies: its modalities in, one sigmoid channel per target out.

    Raises ConfigError when `model.overrides` pins other values.
    """
    implied = {"in_channels": len(store.channels), "out_channels": num_targets(cfg.data.target, store.regions)}
    for key, value in implied.items():
        if key in cfg.model.overrides and cfg.model.overrides[key] != value:
            raise ConfigError(
                f"model.overrides.{key}: {cfg.model.overrides[key]} but the store {cfg.data.store} with "
                f"data.target={cfg.data.target} implies {value}; drop the override"
            )
    return implied["in_channels"], implied["out_channels"]


def build_seeded_model(cfg: ExperimentConfig, in_channels: int, out_channels: int) -> torch.nn.Module:
    """The model with identical initial weights on every rank: the init RNG is seeded from run.seed only."""
    torch.manual_seed(cfg.run.seed)
    overrides = {**cfg.model.overrides, "in_channels": in_channels, "out_channels": out_channels}
    model = build_model(cfg.model.name, cfg.model.preset, **overrides)
    if cfg.model.init_weights:
        state = torch.load(cfg.model.init_weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        logger.info("initial weights from %s", cfg.model.init_weights)
    if channels_last_wanted(cfg.model.channels_last, cfg.data.spatial_dims, dist.device().type):
        use_channels_last(model)
        logger.info("channels-last convolutions (model.channels_last=%s)", cfg.model.channels_last)
    return model
