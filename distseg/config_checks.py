"""Value checks of the experiment config's own sections (`distseg.config`), beyond their types: each raises
`ConfigError` naming the dotted key, what was expected and what was given. The data, loss and monitor sections
check themselves (their `validate`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distseg.config_files import resolve_preset
from distseg.typed_config import ConfigError

if TYPE_CHECKING:
    from distseg.config import (
        CheckpointConfig,
        DebugConfig,
        EngineConfig,
        ExperimentConfig,
        ModelConfig,
        OptimConfig,
        RunConfig,
        TrainConfig,
    )

COMPILE_VALUES = (False, True, "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""`model.compile`: off, torch.compile's default mode, or one of its named modes."""


def _need(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _check_run(c: RunConfig) -> None:
    _need(bool(c.name) and "/" not in c.name and c.name not in (".", ".."), "run.name", "a folder name", c.name)
    _need(bool(c.output_root), "run.output_root", "a folder path", c.output_root)
    _need(c.seed >= 0, "run.seed", "an int >= 0", c.seed)


def _check_model(c: ModelConfig, spatial_dims: int, mode: str) -> None:
    from distseg.models import available_models, model_config

    _need(c.name in available_models(), "model.name", f"one of {available_models()}", c.name)
    try:
        resolved = model_config(c.name, c.preset, **c.overrides)
    except KeyError as e:
        raise ConfigError(f"model.preset: {e.args[0]}") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.overrides: {e}") from e
    _need(c.channels_last in (True, False, "auto"), "model.channels_last", "true, false or auto", c.channels_last)
    _need(c.compile in COMPILE_VALUES, "model.compile", f"one of {list(COMPILE_VALUES)}", c.compile)
    if c.init_weights and not Path(c.init_weights).is_file():
        raise ConfigError(f"model.init_weights: no state dict file at {c.init_weights!r}")
    dims = getattr(resolved, "spatial_dims", 2)
    if dims != spatial_dims:
        raise ConfigError(
            f"model.name: {c.name} is a {dims}D model but data.mode={mode} yields {spatial_dims}D patches; "
            f"pick a {spatial_dims}D model or another data.mode"
        )


def _check_optim(c: OptimConfig) -> None:
    _need(c.name in ("adamw", "sgd"), "optim.name", "'adamw' or 'sgd'", c.name)
    _need(c.lr > 0, "optim.lr", "a learning rate > 0", c.lr)
    _need(c.weight_decay >= 0, "optim.weight_decay", "a number >= 0", c.weight_decay)
    _need(all(0 <= b < 1 for b in c.betas), "optim.betas", "two numbers in [0, 1)", list(c.betas))
    _need(c.eps > 0, "optim.eps", "a number > 0", c.eps)
    _need(0 <= c.momentum < 1, "optim.momentum", "a number in [0, 1)", c.momentum)
    _need(c.schedule in ("cosine", "poly", "constant"), "optim.schedule", "'cosine', 'poly' or 'constant'", c.schedule)
    _need(c.warmup_steps >= 0, "optim.warmup_steps", "an int >= 0", c.warmup_steps)
    _need(0 <= c.min_lr_ratio <= 1, "optim.min_lr_ratio", "a fraction in [0, 1]", c.min_lr_ratio)
    _need(c.poly_power > 0, "optim.poly_power", "a number > 0", c.poly_power)
    _need(c.fused in (True, False, "auto"), "optim.fused", "true, false or auto", c.fused)


def _check_train(c: TrainConfig, ck: CheckpointConfig, dbg: DebugConfig) -> None:
    _need(c.steps >= 1, "train.steps", "an int >= 1", c.steps)
    _need(c.grad_accum >= 1, "train.grad_accum", "an int >= 1", c.grad_accum)
    _need(c.clip_grad >= 0, "train.clip_grad", "a norm >= 0 (0 = off)", c.clip_grad)
    _need(c.val_every >= 0, "train.val_every", "an int >= 0 (0 = never)", c.val_every)
    _need(c.val_mode in ("whole", "crop"), "train.val_mode", "'whole' or 'crop'", c.val_mode)
    _need(0 <= c.val_overlap < 1, "train.val_overlap", "a fraction in [0, 1)", c.val_overlap)
    _need(c.val_window_batch >= 1, "train.val_window_batch", "an int >= 1", c.val_window_batch)
    _need(c.max_nonfinite_in_row >= 1, "train.max_nonfinite_in_row", "an int >= 1", c.max_nonfinite_in_row)
    _need(c.max_minutes is None or (math.isfinite(c.max_minutes) and c.max_minutes > 0), "train.max_minutes",
          "minutes > 0 (or null = no budget)", c.max_minutes)
    _need(c.budget_warmup_steps >= 0, "train.budget_warmup_steps", "an int >= 0", c.budget_warmup_steps)
    _need(c.budget_measure_steps >= 1, "train.budget_measure_steps", "an int >= 1", c.budget_measure_steps)
    _need(c.cudnn_benchmark in (True, False, "auto"), "train.cudnn_benchmark", "true, false or auto",
          c.cudnn_benchmark)
    _need(ck.every >= 0, "checkpoint.every", "an int >= 0 (0 = only at the end)", ck.every)
    _need(ck.keep_last >= 1, "checkpoint.keep_last", "an int >= 1", ck.keep_last)
    _need(ck.resume in ("auto", "never"), "checkpoint.resume", "'auto' or 'never'", ck.resume)
    _need(isinstance(ck.upload_nice, int) and not isinstance(ck.upload_nice, bool) and 0 <= ck.upload_nice <= 19,
          "checkpoint.upload_nice", "an int 0-19", ck.upload_nice)
    _need(dbg.inject_nan_times >= 1, "debug.inject_nan_times", "an int >= 1", dbg.inject_nan_times)


def _check_engine(c: EngineConfig, optim: OptimConfig) -> None:
    _need(c.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "0, 1, 2 or 3", c.zero_stage)
    _need(c.precision in ("bf16", "fp16", "fp32", "auto"), "deepspeed.precision", "'bf16', 'fp16', 'fp32' or 'auto'",
          c.precision)
    if c.offload_optimizer:
        _need(c.zero_stage >= 1, "deepspeed.offload_optimizer", "zero_stage >= 1 to offload", c.zero_stage)
        _need(optim.fused is not True, "optim.fused", "false or auto with deepspeed.offload_optimizer (the "
              "offloaded optimizer is DeepSpeed's CPU Adam)", optim.fused)
    if c.offload_param:
        _need(c.zero_stage == 3, "deepspeed.offload_param", "zero_stage == 3 to offload parameters", c.zero_stage)
    if c.preset:
        resolve_preset(c.preset)  # raises ConfigError naming the value and the shipped presets


def check_sections(cfg: ExperimentConfig) -> None:
    """Check run, model, optim, train/checkpoint/debug, deepspeed and dist of `cfg`."""
    _check_run(cfg.run)
    _check_model(cfg.model, cfg.data.spatial_dims, cfg.data.mode)
    _check_optim(cfg.optim)
    _check_train(cfg.train, cfg.checkpoint, cfg.debug)
    _check_engine(cfg.deepspeed, cfg.optim)
    _need(cfg.dist.timeout_s > 0, "dist.timeout_s", "seconds > 0", cfg.dist.timeout_s)
