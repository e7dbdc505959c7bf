"""Dimension-generic building blocks shared by every model (MONAI style: `spatial_dims` picks 2D or 3D).

Nothing here knows about parallelism or precision: models are plain `nn.Module`s and the engine wraps them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

NormKind = Literal["batch", "group", "instance"]
ActKind = Literal["relu", "leaky_relu"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_MAX_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}


def check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in _CONV:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def conv(
    spatial_dims: int, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, bias: bool = False
) -> nn.Module:
    """Conv2d/Conv3d with 'same' padding for odd kernels (so spatial size only changes through `stride`)."""
    return _CONV[check_spatial_dims(spatial_dims)](
        in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias
    )


def conv_transpose(spatial_dims: int, in_ch: int, out_ch: int, stride: int = 2, bias: bool = True) -> nn.Module:
    """Learned ×`stride` upsampling (kernel = stride, so outputs never overlap: exact inverse of a stride-s grid)."""
    return _CONV_T[check_spatial_dims(spatial_dims)](in_ch, out_ch, kernel_size=stride, stride=stride, bias=bias)


def max_pool(spatial_dims: int, size: int = 2) -> nn.Module:
    return _MAX_POOL[check_spatial_dims(spatial_dims)](size)


def norm(kind: NormKind, spatial_dims: int, channels: int, groups: int = 32) -> nn.Module:
    """A normalisation layer over `channels` feature maps.

    batch: BatchNorm (statistics across the batch; poor with 1–2 samples per GPU).
    group: GroupNorm with min(groups, channels) groups, reduced to a divisor of `channels` (batch-independent).
    instance: affine InstanceNorm without running stats (batch-independent; nnU-Net's choice for 3D).
    """
    check_spatial_dims(spatial_dims)
    if kind == "batch":
        return _BATCH_NORM[spatial_dims](channels)
    if kind == "group":
        g = math.gcd(min(groups, channels), channels)
        return nn.GroupNorm(g, channels)
    if kind == "instance":
        return _INSTANCE_NORM[spatial_dims](channels, affine=True)
    raise ValueError(f"unknown norm {kind!r}; expected one of 'batch', 'group', 'instance'")


def act(kind: ActKind) -> nn.Module:
    """In-place activation: always applied to a fresh norm/add output that backward does not need."""
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leaky_relu":
        return nn.LeakyReLU(0.01, inplace=True)
    raise ValueError(f"unknown activation {kind!r}; expected 'relu' or 'leaky_relu'")


class ConvNormAct(nn.Sequential):
    """conv (no bias: the norm's shift replaces it) → norm → activation. (B, in_ch, *S) → (B, out_ch, *S/stride)."""

    def __init__(
        self,
        spatial_dims: int,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        norm_kind: NormKind = "batch",
        act_kind: ActKind = "relu",
        groups: int = 32,
    ) -> None:
        super().__init__(
            conv(spatial_dims, in_ch, out_ch, kernel_size, stride),
            norm(norm_kind, spatial_dims, out_ch, groups),
            act(act_kind),
        )


def run_stage(module: Callable[..., torch.Tensor], *args: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Run one encoder/decoder stage, recomputing its activations in backward when `use_checkpoint` (saves memory).

    Only checkpoints while gradients are being recorded. The recompute would update BatchNorm running stats a
    second time, so they are restored around it (`_RestoreNormStats`); with it, results match the plain run.
    """
    if use_checkpoint and torch.is_grad_enabled():
        target = module if isinstance(module, nn.Module) else nn.Module()
        return checkpoint(
            module,
            *args,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _RestoreNormStats(target)),
        )
    return module(*args)


def pad_to_multiple(x: torch.Tensor, multiple: int, spatial_dims: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the trailing `spatial_dims` axes at their high end up to the next multiple of `multiple`.

    Returns the padded tensor and the original spatial size (to crop back with `crop_to`). A no-op (same tensor)
    when every size already divides, so the common case costs nothing.
    """
    size = tuple(x.shape[-spatial_dims:])
    extra = [(-s) % multiple for s in size]
    if not any(extra):
        return x, size
    # F.pad takes (last_lo, last_hi, second_last_lo, ...): pad only the high side of each axis.
    pads: list[int] = []
    for e in reversed(extra):
        pads += [0, e]
    return F.pad(x, pads), size


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop the trailing len(size) axes of `x` back to `size` (low-corner aligned, matching `pad_to_multiple`)."""
    if tuple(x.shape[-len(size):]) == tuple(size):
        return x
    index = (Ellipsis, *(slice(0, s) for s in size))
    return x[index]


class _RestoreNormStats:
    """Context manager that snapshots BatchNorm running stats and restores them on exit.

    Entered around the recomputation of a checkpointed stage, so the second (recomputed) forward does not move
    the running statistics a second time: with it, checkpointing changes memory use, never results.
    """

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.saved: list[tuple[torch.Tensor, ...]] = []

    def __enter__(self) -> None:
        self.saved = [
            tuple(t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None)
            for m in self.norms
            if m.track_running_stats
        ]

    def __exit__(self, *exc: object) -> None:
        tracked = [m for m in self.norms if m.track_running_stats]
        with torch.no_grad():
            for m, saved in zip(tracked, self.saved, strict=True):
                live = [t for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None]
                for dst, src in zip(live, saved, strict=True):
                    dst.copy_(src)
        self.saved = []
