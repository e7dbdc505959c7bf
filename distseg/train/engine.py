"""The DeepSpeed engine: its JSON config derived from the experiment config, and `deepspeed.initialize`.

The experiment config is the single source of truth for what training means (batch sizes, accumulation, clipping,
precision, ZeRO stage, offload). A JSON preset (`deepspeed.preset`) may add tuning knobs (bucket sizes,
communication overlap, ...); any derived key may be "auto" there and is filled in; an explicit preset value that
disagrees with the experiment config is an error rather than a silent winner.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distseg.config import ConfigError, ExperimentConfig
from distseg.config_files import resolve_preset
from distseg.train.optim import ScheduleLength, build_optimizer, build_scheduler, param_groups
from distseg.train.speed import fused_wanted

logger = logging.getLogger(__name__)

_OFF = {"enabled": False}


def derived_values(cfg: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed keys the experiment config decides, as a nested dict."""
    micro, accum = cfg.data.batch_size, cfg.train.grad_accum
    engine = cfg.deepspeed
    zero: dict[str, Any] = {"stage": engine.zero_stage}
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if engine.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        # DeepSpeed checks this identity itself; deriving it here keeps it true for any world size.
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": float(cfg.train.clip_grad),
        "bf16": {"enabled": engine.precision == "bf16"},
        # fp16 uses dynamic loss scaling: overflowing steps are skipped by DeepSpeed and the scale lowered.
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16} if engine.precision == "fp16" else _OFF,
        "zero_optimization": zero,
        # SGD with offload runs torch.optim.SGD on the CPU copies; only AdamW has DeepSpeed's CPU kernel.
        "zero_force_ds_cpu_optimizer": cfg.optim.name == "adamw",
        # ZeRO partitions flat fp32 tensors; torch SGD is elementwise over them, so it is safe, just not whitelisted.
        "zero_allow_untested_optimizer": cfg.optim.name == "sgd",
        "steps_per_print": 10**9,  # the trainer logs; keep DeepSpeed's own step prints out of the way
        "wall_clock_breakdown": False,
    }
    # No data_types.buffer_dtype: buffers (BatchNorm running statistics) stay fp32 under bf16/fp16, and
    # `mixed_precision_batchnorm` makes BatchNorm layers accept that (see there).
    return out


def _merge(preset: Any, derived: Any, key: str, source: str) -> Any:
    """Fill "auto" in `preset` from `derived`; explicit preset values must agree with `derived`."""
    if isinstance(preset, str) and preset == "auto":
        return copy.deepcopy(derived)
    if isinstance(preset, dict) and isinstance(derived, dict):
        out = dict(preset)
        for k, v in derived.items():
            out[k] = _merge(preset[k], v, f"{key}.{k}" if key else k, source) if k in preset else copy.deepcopy(v)
        return out
    if preset != derived:
        raise ConfigError(
            f"{source}: {key} is {preset!r} but the experiment config implies {derived!r}; set it to \"auto\" in "
            f"the preset or change the experiment config (deepspeed.*, train.*, data.batch_size)"
        )
    return preset


def _find_auto(node: Any, key: str = "") -> str | None:
    if node == "auto":
        return key
    if isinstance(node, dict):
        for k, v in node.items():
            found = _find_auto(v, f"{key}.{k}" if key else k)
            if found:
                return found
    return None


def build_ds_config(cfg: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for `world_size` ranks. Raises ConfigError for a bad or conflicting preset."""
    cfg = resolve_precision(cfg)
    preset: dict[str, Any] = {}
    if cfg.deepspeed.preset:
        path = resolve_preset(cfg.deepspeed.preset)
        try:
            preset = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"deepspeed.preset: cannot read DeepSpeed JSON {path}: {e}") from e
        if not isinstance(preset, dict):
            raise ConfigError(f"deepspeed.preset: {path} must hold a JSON object")
        for owned in ("optimizer", "scheduler"):
            if owned in preset:
                raise ConfigError(
                    f"deepspeed.preset: {path} has an {owned!r} block; optimizers and schedules come from the "
                    "experiment config's optim section (distseg.train.optim), remove it from the preset"
                )
    ds = _merge(preset, derived_values(cfg, world_size), "", f"deepspeed.preset ({cfg.deepspeed.preset})")
    leftover = _find_auto(ds)
    if leftover:
        raise ConfigError(
            f"deepspeed.preset: {cfg.deepspeed.preset}: {leftover} is \"auto\" but the experiment config does not "
            "derive it; give it a value"
        )
    return ds


def native_precision() -> str:
    """The fastest precision this accelerator runs natively: "bf16", "fp16" or "fp32" (see `deepspeed.precision`)."""
    from distseg.core.dist import accelerator

    acc = accelerator()
    if acc.device_name().startswith("cpu"):
        # DeepSpeed's CPU accelerator reports bf16 as supported everywhere; oneDNN knows whether the CPU has the
        # instructions (AVX512-BF16 / AMX). Without them bf16 conv3d is ~20x slower than fp32 (measured: AMD EPYC,
        # AVX2, unet3d 12-192, 2x4x64^3: 2.2 s fp32 vs ~130 s bf16 per forward+backward).
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    if acc.is_bf16_supported():
        return "bf16"
    return "fp16" if acc.is_fp16_supported() else "fp32"


def resolve_precision(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` with `deepspeed.precision: auto` replaced by `native_precision()` (unchanged otherwise)."""
    if cfg.deepspeed.precision != "auto":
        return cfg
    chosen = native_precision()
    logger.debug("deepspeed.precision auto -> %s on this accelerator", chosen)
    return dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, precision=chosen))


def check_accelerator_support(cfg: ExperimentConfig) -> None:
    """Fail early (before distributed init) when this accelerator cannot run the configured precision."""
    cfg = resolve_precision(cfg)
    from distseg.core.dist import accelerator

    acc = accelerator()
    supported = {"fp32": True, "bf16": acc.is_bf16_supported(), "fp16": acc.is_fp16_supported()}
    if not supported[cfg.deepspeed.precision]:
        ok = [p for p, yes in supported.items() if yes]
        raise ConfigError(
            f"deepspeed.precision: {cfg.deepspeed.precision} is not supported on this accelerator "
            f"({acc.device_name()}); expected one of {ok}"
        )


class _MixedPrecisionBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose running statistics stay fp32 while DeepSpeed holds its weight and bias in bf16/fp16.

    DeepSpeed casts parameters to the training dtype but leaves buffers alone, and `batch_norm` (CPU and CUDA)
    refuses bf16 weights with fp32 running statistics. Casting the two (C,) affine vectors to the statistics'
    dtype selects batch_norm's mixed-type kernel (reduced-precision activations, fp32 statistics and affine),
    so the statistics keep full precision: bf16 running means/vars stall once a momentum update falls below one
    bf16 step (~0.4 % relative). Gradients flow back through the casts into the bf16 parameters.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's _BatchNorm.forward, with the affine vectors cast to the statistics' dtype.
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        dtype = self.running_mean.dtype if self.running_mean is not None else torch.float32
        return F.batch_norm(
            x,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            None if self.weight is None else self.weight.to(dtype),
            None if self.bias is None else self.bias.to(dtype),
            batch_stats,
            factor,
            self.eps,
        )


_MIXED_CLASSES: dict[type, type] = {}


def mixed_precision_batchnorm(model: nn.Module) -> int:
    """Make every BatchNorm of `model` keep fp32 running statistics under bf16/fp16 weights (in place; the class
    of each layer is swapped for a subclass of its own, so state dicts and isinstance checks are unchanged).
    Returns the number of layers changed."""
    changed = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _MixedPrecisionBatchNorm):
            base = type(m)
            if base not in _MIXED_CLASSES:
                _MIXED_CLASSES[base] = type(f"MixedPrecision{base.__name__}", (_MixedPrecisionBatchNorm, base), {})
            m.__class__ = _MIXED_CLASSES[base]
            changed += 1
    return changed


def initialize(
    model: nn.Module, cfg: ExperimentConfig, ds_config: dict[str, Any], schedule_length: ScheduleLength | None = None
):
    """Wrap `model` in a DeepSpeed engine with the configured optimizer and LR schedule.

    Returns the engine; `engine.optimizer` is DeepSpeed's wrapper, `engine.lr_scheduler` our LambdaLR, stepped by
    `engine.step()` once per applied optimizer step (at the gradient-accumulation boundary). `schedule_length`:
    the steps the schedule spans (default `train.steps`); the trainer changes it under a wall-clock budget.
    """
    import deepspeed

    cfg = resolve_precision(cfg)
    if cfg.deepspeed.precision != "fp32":
        mixed_precision_batchnorm(model)
    length = schedule_length or ScheduleLength(cfg.train.steps)

    from distseg.core.dist import device

    fused = fused_wanted(cfg.optim.fused, device().type, cfg.deepspeed.offload_optimizer)
    optimizer = build_optimizer(
        cfg.optim, param_groups(model, cfg.optim.weight_decay), offload=cfg.deepspeed.offload_optimizer, fused=fused
    )
    fused_note = " (fused kernel)" if optimizer.defaults.get("fused") else ""
    logger.info("optimizer %s%s", type(optimizer).__name__, fused_note)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        # A callable: DeepSpeed builds the schedule on its own optimizer wrapper, whose param groups it updates.
        lr_scheduler=lambda opt: build_scheduler(cfg.optim, opt, length),
        config=ds_config,
    )
    return engine
