"""The U-Net of Ronneberger et al. (2015), BN+ReLU variant with 'same' padding; 2D (`unet`) or 3D by `spatial_dims`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distseg.models.base import SegmentationModel
from distseg.models.blocks import ConvStack
from distseg.models.layers import NormKind, check_spatial_dims, conv, conv_transpose, max_pool, run_stage


@dataclass
class UNetConfig:
    spatial_dims: int = 2
    """2 for slices (B, C, H, W), 3 for volumes (B, C, D, H, W)."""
    in_channels: int = 3
    """Input channels: 3 for RGB slices, 4 for the BraTS modalities."""
    out_channels: int = 1
    """Logit channels."""
    features: tuple[int, ...] = (64, 128, 256, 512, 1024)
    """Channels per level; level i runs at 1/2**i resolution, the last level is the bottleneck."""
    bilinear: bool = False
    """Upsample by (bi/tri)linear interpolation instead of transposed convs; halves the deepest level's channels
    as in the reference implementation (17.3M params in 2D instead of 31.0M)."""
    norm: NormKind = "batch"
    """'batch' (the usual U-Net variant), 'group' or 'instance'."""
    activation_checkpointing: bool = False
    """Recompute each encoder/decoder stage in backward instead of storing its activations."""

    def __post_init__(self) -> None:
        check_spatial_dims(self.spatial_dims)
        self.features = tuple(self.features)
        if len(self.features) < 2 or any(c < 1 for c in self.features):
            raise ValueError(f"features needs >= 2 positive channel counts, got {self.features}")
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(f"in_channels/out_channels must be >= 1, got {self.in_channels}/{self.out_channels}")


class _Down(nn.Sequential):
    """Max-pool ×2 then double conv: (B, in_ch, *S) → (B, out_ch, *S/2)."""

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int) -> None:
        super().__init__(max_pool(cfg.spatial_dims), ConvStack(cfg.spatial_dims, in_ch, out_ch, norm_kind=cfg.norm))


class _Up(nn.Module):
    """×2 upsampling, concat with the skip, double conv: (B, in_ch, *S/2) + (B, skip_ch, *S) → (B, out_ch, *S)."""

    def __init__(self, cfg: UNetConfig, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.bilinear = cfg.bilinear
        if cfg.bilinear:
            self.up: nn.Module = nn.Identity()
            up_ch = in_ch
            mid = (in_ch + skip_ch) // 2
        else:
            self.up = conv_transpose(cfg.spatial_dims, in_ch, in_ch // 2)
            up_ch = in_ch // 2
            mid = None
        self.conv = ConvStack(cfg.spatial_dims, up_ch + skip_ch, out_ch, norm_kind=cfg.norm, mid_ch=mid)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.bilinear:
            mode = "bilinear" if x.dim() == 4 else "trilinear"
            x = F.interpolate(x, size=skip.shape[2:], mode=mode, align_corners=True)
        else:
            x = self.up(x)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(SegmentationModel):
    """Ronneberger U-Net: (B, in_channels, *S) → (B, out_channels, *S) logits."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.spatial_dims = cfg.spatial_dims
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.total_stride = 2 ** (len(cfg.features) - 1)
        f = list(cfg.features)
        # With interpolation the bottleneck outputs half its channels so each up block sees skip + same width.
        factor = 2 if cfg.bilinear else 1
        enc_out = [*f[:-1], f[-1] // factor]
        self.inc = ConvStack(cfg.spatial_dims, cfg.in_channels, f[0], norm_kind=cfg.norm)
        self.downs = nn.ModuleList(_Down(cfg, enc_out[i], enc_out[i + 1]) for i in range(len(f) - 1))
        ups = []
        deep = enc_out[-1]
        for i in reversed(range(len(f) - 1)):
            out = f[i] // factor if i > 0 else f[0]
            ups.append(_Up(cfg, deep, f[i], out))
            deep = out
        self.ups = nn.ModuleList(ups)
        self.head = conv(cfg.spatial_dims, f[0], cfg.out_channels, 1, bias=True)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.cfg.activation_checkpointing
        skips = [run_stage(self.inc, x, use_checkpoint=ckpt)]
        for down in self.downs:
            skips.append(run_stage(down, skips[-1], use_checkpoint=ckpt))
        x = skips.pop()
        for up in self.ups:
            x = run_stage(up, x, skips.pop(), use_checkpoint=ckpt)
        return self.head(x)
