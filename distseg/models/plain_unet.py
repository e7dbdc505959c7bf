"""nnU-Net-style plain convolutional U-Net (`unet3d`): strided-conv encoder, transposed-conv decoder, deep supervision.

Topology follows nnU-Net's BraTS 3d_fullres plans for 128³ patches: 6 stages with features 32, 64, 128, 256, 320,
320, two 3×3×3 conv → InstanceNorm → LeakyReLU(0.01) per stage, stride-2 convs downsampling (total stride 32,
128³ → 4³), transposed-conv upsampling, and a 1×1×1 head on every decoder level for deep supervision. One
implementation for 2D and 3D (`spatial_dims`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distseg.models.base import SegmentationModel
from distseg.models.blocks import ConvStack
from distseg.models.layers import ActKind, NormKind, check_spatial_dims, conv, conv_transpose, run_stage


@dataclass
class PlainUNetConfig:
    spatial_dims: int = 3
    """3 for volumes (B, C, D, H, W), 2 for slices."""
    in_channels: int = 4
    """Input channels: the 4 BraTS modalities (T1, T1ce, T2, FLAIR)."""
    out_channels: int = 3
    """Logit channels: the BraTS regions WT, TC, ET (sigmoid each; they overlap)."""
    features: tuple[int, ...] = (32, 64, 128, 256, 320, 320)
    """Channels per stage; stage 0 runs at full resolution, stage i at 1/2**i (stride-2 conv between stages)."""
    convs_per_stage: int = 2
    """3^d convs per encoder and per decoder stage."""
    norm: NormKind = "instance"
    """'instance' (nnU-Net), 'group' or 'batch'."""
    activation: ActKind = "leaky_relu"
    """'leaky_relu' (slope 0.01, nnU-Net) or 'relu'."""
    deep_supervision: bool = False
    """In training mode return logits at every decoder level (full resolution first: len(features) - 1 outputs)."""
    activation_checkpointing: bool = False
    """Recompute each encoder/decoder stage in backward instead of storing its activations (128³ with big batches
    needs it on 40 GB GPUs)."""

    def __post_init__(self) -> None:
        check_spatial_dims(self.spatial_dims)
        self.features = tuple(self.features)
        if len(self.features) < 2 or any(c < 1 for c in self.features):
            raise ValueError(f"features needs >= 2 positive channel counts, got {self.features}")
        for key in ("in_channels", "out_channels", "convs_per_stage"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")


class _DecoderStage(nn.Module):
    """Transposed conv ×2, concat skip, conv stack: (B, deep_ch, *S/2) + (B, ch, *S) → (B, ch, *S)."""

    def __init__(self, cfg: PlainUNetConfig, deep_ch: int, ch: int) -> None:
        super().__init__()
        self.up = conv_transpose(cfg.spatial_dims, deep_ch, ch, bias=False)
        self.convs = ConvStack(cfg.spatial_dims, 2 * ch, ch, cfg.convs_per_stage, 1, cfg.norm, cfg.activation)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class PlainUNet(SegmentationModel):
    """(B, in_channels, *S) → (B, out_channels, *S) logits; with deep supervision in training mode, a list of
    len(features) - 1 logits, level k at 1/2**k resolution."""

    def __init__(self, cfg: PlainUNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.spatial_dims = cfg.spatial_dims
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        f = list(cfg.features)
        self.total_stride = 2 ** (len(f) - 1)
        self.encoder = nn.ModuleList(
            ConvStack(cfg.spatial_dims, c_in, c_out, cfg.convs_per_stage, 1 if i == 0 else 2, cfg.norm, cfg.activation)
            for i, (c_in, c_out) in enumerate(zip([cfg.in_channels, *f[:-1]], f, strict=True))
        )
        # decoder[i] produces level i; it runs deepest first.
        self.decoder = nn.ModuleList(_DecoderStage(cfg, f[i + 1], f[i]) for i in range(len(f) - 1))
        n_heads = len(f) - 1 if cfg.deep_supervision else 1
        self.heads = nn.ModuleList(conv(cfg.spatial_dims, f[i], cfg.out_channels, 1, bias=True) for i in range(n_heads))

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        ckpt = self.cfg.activation_checkpointing
        skips = []
        for stage in self.encoder:
            x = run_stage(stage, x, use_checkpoint=ckpt)
            skips.append(x)
        x = skips.pop()
        levels: list[torch.Tensor] = [x] * len(self.decoder)
        for i in reversed(range(len(self.decoder))):
            x = run_stage(self.decoder[i], x, skips[i], use_checkpoint=ckpt)
            levels[i] = x
        if self.cfg.deep_supervision and self.training:
            return [head(level) for head, level in zip(self.heads, levels, strict=False)]
        return self.heads[0](levels[0])
