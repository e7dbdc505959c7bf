"""`resnet50_unet`: a torchvision-compatible ResNet-50 encoder with a transposed-conv U-Net decoder (2D)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distseg.models.base import SegmentationModel
from distseg.models.blocks import ConvStack
from distseg.models.layers import NormKind, conv, conv_transpose, run_stage
from distseg.models.resnet import ResNetEncoder, load_encoder_weights


@dataclass
class ResNetUNetConfig:
    in_channels: int = 3
    """Input channels; with pretrained RGB weights and another count the stem is adapted (see adapt_stem_weight)."""
    out_channels: int = 1
    """Logit channels."""
    encoder_layers: tuple[int, ...] = (3, 4, 6, 3)
    """Bottleneck blocks in layer1..layer4; (3, 4, 6, 3) is ResNet-50. Exactly four stages."""
    encoder_width: int = 64
    """Stem channels (64 for ResNet-50); layer i outputs 4·width·2**(i-1)."""
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    """Channels of the five decoder stages, deepest (1/16) first, the last at full resolution without a skip."""
    decoder_norm: NormKind = "batch"
    """Norm in the decoder ('batch', 'group' or 'instance'); the encoder always uses BatchNorm (pretrained)."""
    encoder_weights: str | None = None
    """Path to a torchvision-format ResNet state dict (`torch.save(resnet50().state_dict())`); fc.* ignored."""
    freeze_encoder_stages: int = 0
    """Freeze the first N encoder units (0 = none, 1 = stem, 2 = stem + layer1, ..., 5 = whole encoder): no
    gradients and BatchNorm kept in eval mode even under model.train()."""
    activation_checkpointing: bool = False
    """Recompute each encoder layer and decoder stage in backward instead of storing its activations."""

    def __post_init__(self) -> None:
        self.encoder_layers = tuple(self.encoder_layers)
        self.decoder_channels = tuple(self.decoder_channels)
        if len(self.encoder_layers) != 4 or any(n < 1 for n in self.encoder_layers):
            raise ValueError(f"encoder_layers must be 4 positive block counts, got {self.encoder_layers}")
        if len(self.decoder_channels) != 5 or any(c < 1 for c in self.decoder_channels):
            raise ValueError(f"decoder_channels must be 5 positive channel counts, got {self.decoder_channels}")
        if not 0 <= self.freeze_encoder_stages <= 5:
            raise ValueError(f"freeze_encoder_stages must be in 0..5, got {self.freeze_encoder_stages}")
        if self.in_channels < 1 or self.out_channels < 1 or self.encoder_width < 1:
            raise ValueError("in_channels, out_channels and encoder_width must be >= 1")


class _DecoderStage(nn.Module):
    """Transposed conv ×2, optional skip concat, two 3×3 convs: (B, c_in, H/2, W/2) [+ skip] → (B, c_out, H, W)."""

    def __init__(self, c_in: int, skip_ch: int, c_out: int, norm_kind: NormKind) -> None:
        super().__init__()
        self.up = conv_transpose(2, c_in, c_out)
        self.convs = ConvStack(2, c_out + skip_ch, c_out, norm_kind=norm_kind)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        return self.convs(x if skip is None else torch.cat([x, skip], dim=1))


class ResNetUNet(SegmentationModel):
    """(B, in_channels, H, W) → (B, out_channels, H, W) logits; total stride 32."""

    def __init__(self, cfg: ResNetUNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.spatial_dims = 2
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.total_stride = 32
        self.encoder = ResNetEncoder(cfg.in_channels, cfg.encoder_layers, cfg.encoder_width)
        if cfg.encoder_weights:
            load_encoder_weights(self.encoder, cfg.encoder_weights)
        enc = self.encoder.channels  # [stem, layer1..layer4]
        skips = [enc[3], enc[2], enc[1], enc[0], 0]  # skip channels for decoder stages at 1/16 .. 1/1
        ins = [enc[4], *cfg.decoder_channels[:-1]]
        self.decoder = nn.ModuleList(
            _DecoderStage(c_in, s, c_out, cfg.decoder_norm)
            for c_in, s, c_out in zip(ins, skips, cfg.decoder_channels, strict=True)
        )
        self.head = conv(2, cfg.decoder_channels[-1], cfg.out_channels, 1, bias=True)
        self._frozen = self.encoder.stages()[: cfg.freeze_encoder_stages]
        for unit in self._frozen:
            unit.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> ResNetUNet:
        super().train(mode)
        # Frozen units keep their pretrained BatchNorm statistics: never let model.train() switch them back.
        for unit in getattr(self, "_frozen", []):
            unit.eval()
        return self

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.cfg.activation_checkpointing
        e = self.encoder
        stem = e.stem(x)
        f1 = run_stage(e.layer1, e.maxpool(stem), use_checkpoint=ckpt)
        f2 = run_stage(e.layer2, f1, use_checkpoint=ckpt)
        f3 = run_stage(e.layer3, f2, use_checkpoint=ckpt)
        f4 = run_stage(e.layer4, f3, use_checkpoint=ckpt)
        y = f4
        for stage, skip in zip(self.decoder, [f3, f2, f1, stem, None], strict=True):
            y = run_stage(stage, y, skip, use_checkpoint=ckpt) if skip is not None else stage(y)
        return self.head(y)
