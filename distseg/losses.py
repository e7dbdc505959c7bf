"""Segmentation losses (the `loss:` section of an experiment config).

Two losses, both `weight_ce * cross-entropy + weight_dice * (1 - soft Dice)`:

- ``bce_dice``: sigmoid per channel. Binary 2D (K=1) and BraTS region training (K=3: WT, TC, ET overlap, so each
  channel is an independent binary problem, as in nnU-Net's region-based training).
- ``ce_dice``: softmax over K mutually exclusive classes with one-hot targets; Dice excludes the background channel 0
  unless ``dice_include_background``.

Deep supervision: a list of logits [full, 1/2, 1/4, ...] gets one loss per scale with the target downsampled to that
scale, combined with weights 1/2^i normalised to sum 1 and the lowest-resolution scale dropped (nnU-Net's default),
unless the config lists explicit weights.

The loss is computed in fp32 (logits are cast, autocast is disabled inside) so bf16/fp16 training gets stable sums;
nothing in `forward` reads a tensor value on the host, so the loss adds no device->host syncs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOSS_NAMES = ("bce_dice", "ce_dice")
DOWNSAMPLE_MODES = ("nearest", "max")


def _is_num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class LossConfig:
    """Loss choice and weights."""

    name: str = "bce_dice"
    """"bce_dice" (sigmoid per channel: binary masks, BraTS WT/TC/ET regions) or "ce_dice" (softmax, one-hot)."""
    bce_weight: float = 1.0
    """Weight of the (binary) cross-entropy term."""
    dice_weight: float = 1.0
    """Weight of the soft Dice term (1 - Dice)."""
    smooth: float = 1e-5
    """Added to the Dice numerator and denominator: an empty target with an empty prediction gives Dice 1 (loss 0)
    instead of 0/0, and the term stays finite for any input."""
    batch_dice: bool = True
    """Sum Dice statistics over the whole batch, not per sample (nnU-Net): small batches of patches that are often
    empty in one channel then give a stable, low-variance Dice term."""
    dice_include_background: bool = False
    """ce_dice only: also average Dice over the background channel 0."""
    deep_supervision_weights: tuple[float, ...] | None = None
    """Weights per output scale [full, 1/2, ...] when the model returns a list; None = nnU-Net default (1/2^i, the
    lowest scale dropped, normalised to sum 1). Explicit weights must have one entry per scale and are normalised."""
    deep_supervision_downsample: str = "nearest"
    """How targets are brought to a lower-resolution scale: "nearest" (nnU-Net) or "max" (max-pool; keeps small
    structures present at coarse scales)."""

    def validate(self, prefix: str = "loss") -> None:
        """Raise ValueError naming ``<prefix>.<field>`` for the first invalid field."""
        if self.name not in LOSS_NAMES:
            raise ValueError(f"{prefix}.name: expected one of {list(LOSS_NAMES)}, got {self.name!r}")
        for key in ("bce_weight", "dice_weight"):
            value = getattr(self, key)
            if not _is_num(value) or value < 0:
                raise ValueError(f"{prefix}.{key}: expected a number >= 0, got {value!r}")
        if self.bce_weight == 0 and self.dice_weight == 0:
            raise ValueError(f"{prefix}.bce_weight/{prefix}.dice_weight: at least one must be > 0, both are 0")
        if not _is_num(self.smooth) or self.smooth <= 0:
            raise ValueError(f"{prefix}.smooth: expected a number > 0, got {self.smooth!r}")
        for key in ("batch_dice", "dice_include_background"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{prefix}.{key}: expected true/false, got {getattr(self, key)!r}")
        w = self.deep_supervision_weights
        if w is not None and (
            not isinstance(w, (tuple, list)) or not w or not all(_is_num(v) and v >= 0 for v in w) or sum(w) <= 0
        ):
            raise ValueError(
                f"{prefix}.deep_supervision_weights: expected null or a non-empty list of numbers >= 0 with a "
                f"positive sum, got {w!r}"
            )
        if self.deep_supervision_downsample not in DOWNSAMPLE_MODES:
            raise ValueError(
                f"{prefix}.deep_supervision_downsample: expected one of {list(DOWNSAMPLE_MODES)}, "
                f"got {self.deep_supervision_downsample!r}"
            )


def deep_supervision_weights(n_scales: int) -> list[float]:
    """nnU-Net's default weights for outputs [full, 1/2, 1/4, ...]: 1/2^i, the last (coarsest) scale set to 0 when
    there is more than one scale, normalised to sum 1. E.g. 3 scales -> [2/3, 1/3, 0]."""
    if n_scales < 1:
        raise ValueError(f"deep supervision needs at least one output scale, got {n_scales}")
    weights = [1.0 / 2**i for i in range(n_scales)]
    if n_scales > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def soft_dice(probs: torch.Tensor, targets: torch.Tensor, smooth: float, batch_dice: bool) -> torch.Tensor:
    """Soft Dice per channel. probs, targets: (B, K, *S) in [0, 1]. Returns (K,) if batch_dice else (B, K)."""
    axes = (0, *range(2, probs.ndim)) if batch_dice else tuple(range(2, probs.ndim))
    intersection = (probs * targets).sum(axes)
    denominator = probs.sum(axes) + targets.sum(axes)
    return (2.0 * intersection + smooth) / (denominator + smooth)


def downsample_targets(targets: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """Targets (B, K, *S) float -> (B, K, *size) by nearest neighbour or max-pool (both keep values in {0, 1})."""
    if tuple(targets.shape[2:]) == tuple(size):
        return targets
    if mode == "nearest":
        return F.interpolate(targets, size=tuple(size), mode="nearest")
    pool = F.adaptive_max_pool2d if targets.ndim == 4 else F.adaptive_max_pool3d
    return pool(targets, tuple(size))


class SegmentationLoss(nn.Module):
    """Cross-entropy + soft Dice with optional deep supervision; see the module docstring.

    forward(logits (B, K, *S) | list of such at decreasing resolution, targets float (B, K, *S)) -> scalar fp32.
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg

    def _single(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.name == "bce_dice":
            ce = F.binary_cross_entropy_with_logits(logits, targets) if cfg.bce_weight else logits.new_zeros(())
            dice = soft_dice(torch.sigmoid(logits), targets, cfg.smooth, cfg.batch_dice) if cfg.dice_weight else None
        else:
            log_probs = F.log_softmax(logits, dim=1)
            # Soft-target CE: -sum_k t_k log p_k, averaged over voxels (equals F.cross_entropy for one-hot targets).
            ce = -(targets * log_probs).sum(1).mean() if cfg.bce_weight else logits.new_zeros(())
            dice = soft_dice(log_probs.exp(), targets, cfg.smooth, cfg.batch_dice) if cfg.dice_weight else None
            if dice is not None and not cfg.dice_include_background and logits.shape[1] > 1:
                dice = dice[..., 1:]
        loss = cfg.bce_weight * ce
        if dice is not None:
            loss = loss + cfg.dice_weight * (1.0 - dice.mean())
        return loss

    def forward(self, logits: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        outputs = [logits] if isinstance(logits, torch.Tensor) else list(logits)
        if not outputs:
            raise ValueError("loss: got an empty list of logits")
        if self.cfg.deep_supervision_weights is None:
            weights = deep_supervision_weights(len(outputs))
        else:
            weights = list(self.cfg.deep_supervision_weights)
            if len(weights) != len(outputs):
                raise ValueError(
                    f"loss.deep_supervision_weights: has {len(weights)} entries but the model returned "
                    f"{len(outputs)} output scales"
                )
            weights = [w / sum(weights) for w in weights]
        full = outputs[0]
        if targets.shape[0] != full.shape[0] or targets.shape[2:] != full.shape[2:] or targets.ndim != full.ndim:
            raise ValueError(
                f"loss: targets {tuple(targets.shape)} do not match logits {tuple(full.shape)}; expected (B, K, *S)"
            )
        if targets.shape[1] != full.shape[1]:
            raise ValueError(
                f"loss: targets have {targets.shape[1]} channels, logits {full.shape[1]}; for '{self.cfg.name}' "
                "targets must be (B, K, *S) with one channel per output"
            )
        # fp32 even under bf16/fp16 autocast: Dice sums over ~10^6 voxels lose precision in half types.
        with torch.autocast(device_type=full.device.type, enabled=False):
            targets = targets.float()
            total = full.new_zeros((), dtype=torch.float32)
            for out, weight in zip(outputs, weights, strict=True):
                if weight == 0:
                    # Keep the dropped scale's head in the graph with a zero gradient: ZeRO/DDP reduction hooks
                    # expect every trainable parameter to receive a gradient each step.
                    total = total + 0.0 * out.float().sum()
                    continue
                scaled = downsample_targets(targets, out.shape[2:], self.cfg.deep_supervision_downsample)
                total = total + weight * self._single(out.float(), scaled)
        return total


def build_loss(cfg: LossConfig) -> SegmentationLoss:
    """Build the loss module for `cfg` (validated; raises ValueError naming the bad ``loss.*`` key)."""
    return SegmentationLoss(cfg)
