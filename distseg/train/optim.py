"""Optimizers and learning-rate schedules, built in code and handed to `deepspeed.initialize`.

Why client-side torch optimizers rather than DeepSpeed's JSON "optimizer" block: the JSON block has no SGD, while
building the optimizer here gives one code path for both choices, typed config checks, and a plain
`torch.optim.lr_scheduler.LambdaLR` that DeepSpeed steps once per optimizer step (in `engine.step()` at the
gradient-accumulation boundary). ZeRO-Offload keeps optimizer states on the CPU, where DeepSpeed wants its
vectorised `DeepSpeedCPUAdam` (a C++ extension built on first use, ~1 min, then cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from distseg.config import OptimConfig

logger = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights of convs/linears decay; biases and norm parameters (1-D tensors) do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(cfg: OptimConfig, params: Iterable, offload: bool = False,
                    fused: bool = False) -> torch.optim.Optimizer:
    """AdamW or SGD-Nesterov over `params` (parameter groups). `offload`: optimizer states live on the CPU.
    `fused`: torch's fused AdamW kernel (`optim.fused` resolved by `distseg.train.speed.fused_wanted`)."""
    if cfg.name == "adamw":
        if offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adamw_mode=True)
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
    if cfg.name == "sgd":
        # With offload this runs torch SGD on the CPU copies (the engine allows it via zero_force_ds_cpu_optimizer).
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    raise ValueError(f"optim.name: expected 'adamw' or 'sgd', got {cfg.name!r}")


class ScheduleLength:
    """The optimizer steps a schedule spans (mutable): `train.steps`, or the wall-clock plan of `distseg.train.budget`.

    The LR multiplier reads `total` at every step, so a plan made after the run has measured its step time lays
    the decay over the steps that fit; the trainer refreshes the current LR whenever it changes `total`.
    """

    def __init__(self, total: int) -> None:
        self.total = int(total)


def lr_lambda(cfg: OptimConfig, total_steps: int | ScheduleLength) -> Callable[[int], float]:
    """Multiplier of `cfg.lr` for optimizer step `s` (0-based: the update of step s+1): linear warm-up, then
    cosine/poly/constant decay.

    Warm-up: (s + 1) / warmup_steps, so the very first step already moves. Decay: t = progress in [0, 1] from the
    first step after warm-up to the LAST step (s = total - 1), so the last update runs at exactly `min_lr_ratio`
    (the schedule reaches its end). `total_steps` may be a `ScheduleLength` whose value changes during the run.
    """
    length = total_steps if isinstance(total_steps, ScheduleLength) else ScheduleLength(total_steps)
    warmup = cfg.warmup_steps
    floor = cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        decay_steps = length.total - 1 - warmup
        # decay_steps <= 0: the last step is the first after warm-up, and it is at the floor too
        t = min(1.0, (step - warmup) / decay_steps) if decay_steps > 0 else 1.0
        if cfg.schedule == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
        if cfg.schedule == "poly":
            return floor + (1.0 - floor) * (1.0 - t) ** cfg.poly_power
        return 1.0

    return factor


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int | ScheduleLength):
    """A LambdaLR over `optimizer`; the DeepSpeed engine calls its `step()` once per applied optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))


def refresh_lr(scheduler: torch.optim.lr_scheduler.LambdaLR) -> float:
    """Re-evaluate the schedule at its current position (after its `ScheduleLength` changed) and set the optimizer's
    learning rates for the next step. Returns the first group's new LR."""
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    return lrs[0]
