"""A ResNet encoder whose state-dict keys match torchvision's `resnet50` exactly (written here without torchvision).

Keys: conv1, bn1, layer1..layer4.{i}.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.0,downsample.1}; no `fc` (a
segmentation encoder has no classifier, and loading ignores fc.*). Stride on the 3×3 conv (torchvision's "v1.5").
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

EXPANSION = 4


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (stride) → 1×1 expand ×4, plus shortcut: (B, inplanes, H, W) → (B, 4·planes, H/s, W/s)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNetEncoder(nn.Module):
    """ResNet trunk returning the five feature maps a U-Net decoder needs.

    (B, in_channels, H, W) → [stem (B, w, H/2, W/2), layer1 (B, 4w, H/4), layer2 (B, 8w, H/8),
    layer3 (B, 16w, H/16), layer4 (B, 32w, H/32)] with w = `width` (64 for ResNet-50).
    """

    def __init__(self, in_channels: int = 3, layers: tuple[int, ...] = (3, 4, 6, 3), width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * EXPANSION),
            )
            stage = [Bottleneck(inplanes, planes, stride, downsample)]
            inplanes = planes * EXPANSION
            stage += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.channels = [width] + [width * 2**i * EXPANSION for i in range(len(layers))]

    def stages(self) -> list[nn.Module]:
        """Freezable units in order: 0 = stem (conv1 + bn1), 1..4 = layer1..layer4."""
        stem = nn.ModuleList([self.conv1, self.bn1])
        return [stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))


def adapt_stem_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Map a (out, 3, k, k) RGB stem filter to `in_channels` inputs.

    Every new input channel gets the mean of the RGB filters, scaled by 3 / in_channels: a stack of identical
    channels then produces the same response the pretrained net gives a grey RGB image, so activation scale is kept
    whatever the channel count (1 for single MRI slices, 4 for BraTS modalities).
    """
    if weight.shape[1] == in_channels:
        return weight
    mean = weight.mean(dim=1, keepdim=True)
    return (mean * (3.0 / in_channels)).expand(-1, in_channels, -1, -1).contiguous()


def load_encoder_weights(encoder: ResNetEncoder, path: str | Path) -> None:
    """Load a torchvision-format ResNet state dict from a local file into `encoder` (nothing is downloaded).

    Strict on encoder keys (a missing or unexpected key, or a shape mismatch other than the stem's input channels,
    is an error naming them); `fc.*` is ignored; the stem is adapted with `adapt_stem_weight` when the file's
    conv1 has 3 input channels and the model another count.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder_weights: no such file {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"encoder_weights {path}: expected a state dict (key -> tensor), got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"encoder_weights {path} does not match the ResNet encoder: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''} ({len(missing)} total), unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} total)"
        )
    in_channels = encoder.conv1.in_channels
    if state["conv1.weight"].shape[1] != in_channels:
        logger.info("adapting stem conv1 from %d to %d input channels (mean of RGB filters × 3/C)",
                    state["conv1.weight"].shape[1], in_channels)
        state["conv1.weight"] = adapt_stem_weight(state["conv1.weight"], in_channels)
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
           for k, v in state.items() if v.shape != expected[k].shape]
    if bad:
        raise ValueError(f"encoder_weights {path}: shape mismatch for {bad[:8]} ({len(bad)} total)")
    encoder.load_state_dict(state, strict=True)
    logger.info("loaded %d encoder tensors from %s", len(state), path)
