"""Blocks shared by the U-Net family, written once for 2D and 3D (`spatial_dims`)."""

from __future__ import annotations

import torch
from torch import nn

from distseg.models.layers import ActKind, ConvNormAct, NormKind, act, conv, norm


class ConvStack(nn.Sequential):
    """`num_convs` × (3^d conv → norm → act); the first conv takes `stride` (strided-conv downsampling).

    (B, in_ch, *S) → (B, out_ch, *S / stride).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_ch: int,
        out_ch: int,
        num_convs: int = 2,
        stride: int = 1,
        norm_kind: NormKind = "batch",
        act_kind: ActKind = "relu",
        mid_ch: int | None = None,
    ) -> None:
        mid = out_ch if mid_ch is None else mid_ch
        layers = []
        for i in range(num_convs):
            c_in = in_ch if i == 0 else mid
            c_out = out_ch if i == num_convs - 1 else mid
            layers.append(ConvNormAct(spatial_dims, c_in, c_out, 3, stride if i == 0 else 1, norm_kind, act_kind))
        super().__init__(*layers)


class ResInceptionBlock(nn.Module):
    """Residual-inception block: (B, in_ch, *S) → (B, out_ch, *S).

    Three parallel branches of width b = round(out_ch * branch_ratio):
      1×1;  1×1 reduce → 3×3;  1×1 reduce → 3×3 → 3×3 (a 5×5 receptive field, factorised as in Inception-v3),
    concatenated (3b channels), projected by a 1×1 conv + norm to out_ch, added to the residual path (identity, or a
    1×1 conv + norm when the channel count changes), then activated. The 1×1 reduce convs keep the wide stages of
    the network affordable; `branch_ratio` trades parameters for capacity.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_ch: int,
        out_ch: int,
        branch_ratio: float = 0.5,
        norm_kind: NormKind = "group",
        act_kind: ActKind = "relu",
    ) -> None:
        super().__init__()
        b = max(1, round(out_ch * branch_ratio))

        def cna(c_in: int, c_out: int, k: int) -> ConvNormAct:
            return ConvNormAct(spatial_dims, c_in, c_out, k, 1, norm_kind, act_kind)

        self.branch1 = cna(in_ch, b, 1)
        self.branch3 = nn.Sequential(cna(in_ch, b, 1), cna(b, b, 3))
        self.branch5 = nn.Sequential(cna(in_ch, b, 1), cna(b, b, 3), cna(b, b, 3))
        self.project = nn.Sequential(conv(spatial_dims, 3 * b, out_ch, 1), norm(norm_kind, spatial_dims, out_ch))
        self.residual: nn.Module = (
            nn.Identity()
            if in_ch == out_ch
            else nn.Sequential(conv(spatial_dims, in_ch, out_ch, 1), norm(norm_kind, spatial_dims, out_ch))
        )
        self.act = act(act_kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = torch.cat([self.branch1(x), self.branch3(x), self.branch5(x)], dim=1)
        # The sum is a fresh tensor that backward does not need, so the in-place activation is safe.
        return self.act(self.project(branches) + self.residual(x))
