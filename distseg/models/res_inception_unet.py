"""Residual-inception U-Net, one implementation for 2D (`res_inception_unet`) and 3D (`res_inception_unet3d`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distseg.models.base import SegmentationModel
from distseg.models.blocks import ResInceptionBlock
from distseg.models.layers import ActKind, NormKind, check_spatial_dims, conv, conv_transpose, max_pool, run_stage


@dataclass
class ResInceptionUNetConfig:
    spatial_dims: int = 2
    """2 for slices (B, C, H, W), 3 for volumes (B, C, D, H, W)."""
    in_channels: int = 3
    """Input channels: 3 for RGB slices, 4 for the BraTS modalities (T1, T1ce, T2, FLAIR)."""
    out_channels: int = 1
    """Logit channels: 1 for binary masks, 3 for the BraTS regions (WT, TC, ET)."""
    encoder_channels: tuple[int, ...] = (128, 256, 512, 1024)
    """Channels of each encoder stage; stage i runs at 1/2**i resolution (max-pool between stages)."""
    bottleneck_channels: int = 2048
    """Channels of the bottleneck at 1/2**len(encoder_channels) resolution (the total stride)."""
    blocks_per_stage: int = 1
    """Residual-inception blocks per encoder/decoder stage."""
    branch_ratio: float = 0.42
    """Width of each of the three inception branches as a fraction of the block's output channels (0.42 puts the
    2D default at 65.8M parameters)."""
    norm: NormKind = "group"
    """'group' (default: batch-independent, so 1–2 samples per GPU train as well as 32), 'instance' or 'batch'."""
    activation: ActKind = "relu"
    """'relu' or 'leaky_relu' (negative slope 0.01)."""
    deep_supervision: bool = False
    """In training mode return logits at every decoder level (full resolution first) for a multi-scale loss."""
    activation_checkpointing: bool = False
    """Recompute each encoder/decoder stage in backward instead of storing its activations (less memory, ~30% more
    compute)."""

    def __post_init__(self) -> None:
        check_spatial_dims(self.spatial_dims)
        self.encoder_channels = tuple(self.encoder_channels)
        if not self.encoder_channels or any(c < 1 for c in self.encoder_channels):
            raise ValueError(f"encoder_channels must be a non-empty list of positive ints, got {self.encoder_channels}")
        for key in ("in_channels", "out_channels", "bottleneck_channels", "blocks_per_stage"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0 < self.branch_ratio <= 1:
            raise ValueError(f"branch_ratio must be in (0, 1], got {self.branch_ratio}")


class _Stage(nn.Sequential):
    """`blocks_per_stage` residual-inception blocks: (B, in_ch, *S) → (B, out_ch, *S)."""

    def __init__(self, cfg: ResInceptionUNetConfig, in_ch: int, out_ch: int) -> None:
        super().__init__(
            *(
                ResInceptionBlock(cfg.spatial_dims, in_ch if i == 0 else out_ch, out_ch, cfg.branch_ratio, cfg.norm,
                                  cfg.activation)
                for i in range(cfg.blocks_per_stage)
            )
        )


class _DecoderStage(nn.Module):
    """Transposed-conv ×2 upsampling, concatenation with the skip, blocks: (B, c_deep, *S/2) + skip → (B, c, *S)."""

    def __init__(self, cfg: ResInceptionUNetConfig, deep_ch: int, out_ch: int) -> None:
        super().__init__()
        self.up = conv_transpose(cfg.spatial_dims, deep_ch, out_ch)
        self.blocks = _Stage(cfg, 2 * out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.blocks(torch.cat([self.up(x), skip], dim=1))


class ResInceptionUNet(SegmentationModel):
    """U-Net whose stages are residual-inception blocks; symmetric encoder/decoder with skip connections.

    (B, in_channels, *S) → (B, out_channels, *S) logits; a list of them with deep supervision in training mode.
    """

    def __init__(self, cfg: ResInceptionUNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.spatial_dims = cfg.spatial_dims
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.total_stride = 2 ** len(cfg.encoder_channels)
        chans = list(cfg.encoder_channels)
        self.pool = max_pool(cfg.spatial_dims)
        self.encoder = nn.ModuleList(
            _Stage(cfg, c_in, c_out) for c_in, c_out in zip([cfg.in_channels, *chans[:-1]], chans, strict=True)
        )
        self.bottleneck = _Stage(cfg, chans[-1], cfg.bottleneck_channels)
        deeper = [*chans[1:], cfg.bottleneck_channels]
        # decoder[i] produces level i (resolution 1/2**i); it runs deepest first.
        self.decoder = nn.ModuleList(_DecoderStage(cfg, d, c) for d, c in zip(deeper, chans, strict=True))
        n_heads = len(chans) if cfg.deep_supervision else 1
        self.heads = nn.ModuleList(
            conv(cfg.spatial_dims, chans[i], cfg.out_channels, 1, bias=True) for i in range(n_heads)
        )

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        ckpt = self.cfg.activation_checkpointing
        skips = []
        for i, stage in enumerate(self.encoder):
            x = run_stage(stage, x if i == 0 else self.pool(x), use_checkpoint=ckpt)
            skips.append(x)
        x = run_stage(self.bottleneck, self.pool(x), use_checkpoint=ckpt)
        levels: list[torch.Tensor] = [x] * len(self.decoder)
        for i in reversed(range(len(self.decoder))):
            x = run_stage(self.decoder[i], x, skips[i], use_checkpoint=ckpt)
            levels[i] = x
        if self.cfg.deep_supervision and self.training:
            return [head(level) for head, level in zip(self.heads, levels, strict=False)]
        return self.heads[0](levels[0])
