"""`SegmentationModel`: the common contract every registered model follows.

Contract: input (B, in_channels, *spatial) with any spatial size; output raw logits (B, out_channels, *spatial).
Sizes that the network's total stride does not divide are zero-padded at the high end of each axis up to the next
multiple, run, and cropped back, so every output voxel lines up with the input voxel at the same index.
With deep supervision on and the model in training mode, the output is a list, full resolution first, then each
coarser decoder level k with shape (B, out_channels, *ceil(spatial / 2**k)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distseg.models.layers import crop_to, pad_to_multiple


class SegmentationModel(nn.Module):
    """Base class: pads to `total_stride`, calls `forward_padded`, crops back (see module docstring)."""

    spatial_dims: int
    in_channels: int
    out_channels: int
    total_stride: int

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(B, C_in, *S) with every S divisible by `total_stride` → logits (or a list of logits, finest first)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input (B, {self.in_channels}, "
                f"{', '.join('S' * self.spatial_dims)}), got shape {tuple(x.shape)}"
            )
        padded, size = pad_to_multiple(x, self.total_stride, self.spatial_dims)
        if getattr(self.cfg, "norm", None) == "instance" and all(s == self.total_stride for s in padded.shape[2:]):
            # Instance norm over a 1-voxel bottleneck is undefined (torch raises a cryptic error deep inside).
            raise ValueError(
                f"{type(self).__name__} with instance norm needs an input larger than its total stride "
                f"{self.total_stride} along at least one spatial axis (the bottleneck would be 1 voxel); "
                f"got spatial size {tuple(size)}"
            )
        out = self.forward_padded(padded)
        if isinstance(out, torch.Tensor):
            return crop_to(out, size)
        # Deep-supervision level k was computed at 1/2**k of the padded size; crop to the unpadded equivalent.
        return [crop_to(o, [math.ceil(s / 2**k) for s in size]) for k, o in enumerate(out)]
