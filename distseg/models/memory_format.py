"""Channels-last convolutions (NDHWC / NHWC) that leave the parameters' storage alone.

`model.to(memory_format=torch.channels_last_3d)` restrides the weights, but DeepSpeed's ZeRO optimizers replace
every parameter's data with a view of their flat (contiguous) buffer, so the layout would not survive
`deepspeed.initialize`. Here each convolution instead passes a channels-last copy of its weight to the kernel at
every call (autograd brings the gradient back to the contiguous parameter) and the model's input is made
channels-last: activations then stay channels-last through the network, which is where the time goes. Parameter
names, shapes, state dicts and checkpoints are unchanged.

Measured on one AVX2 core in fp32 (`tests/benchmarks/bench_channels_last.py`, fwd + bwd + AdamW): unet3d 8-128 on
2x4x64^3 1.32x faster, 12-192 1.25x, the same loss to 5 decimals; the 2D models are slower channels-last on this
CPU (res_inception_unet 16-128 0.55x, unet 0.85x on 4x3x128^2). In the trainer (`brats_budget_cv` on the real
BraTS store, 2 ranks, ZeRO-2): 2.14-2.35 s -> 1.85-1.98 s per step (1.16-1.19x), the same losses. Hence
`model.channels_last: auto` = 3D models on the CPU. GPUs: not measured yet (`make gpu-check` runs the benchmark).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_FORMAT = {2: torch.channels_last, 3: torch.channels_last_3d}


class ChannelsLastConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.contiguous(memory_format=torch.channels_last), self.bias)


class ChannelsLastConv3d(nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.contiguous(memory_format=torch.channels_last_3d), self.bias)


class ChannelsLastConvTranspose2d(nn.ConvTranspose2d):
    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        pad = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation)
        return F.conv_transpose2d(x, self.weight.contiguous(memory_format=torch.channels_last), self.bias,
                                  self.stride, self.padding, pad, self.groups, self.dilation)


class ChannelsLastConvTranspose3d(nn.ConvTranspose3d):
    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        pad = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 3, self.dilation)
        return F.conv_transpose3d(x, self.weight.contiguous(memory_format=torch.channels_last_3d), self.bias,
                                  self.stride, self.padding, pad, self.groups, self.dilation)


_SWAP: dict[type, type] = {nn.Conv2d: ChannelsLastConv2d, nn.Conv3d: ChannelsLastConv3d,
                           nn.ConvTranspose2d: ChannelsLastConvTranspose2d,
                           nn.ConvTranspose3d: ChannelsLastConvTranspose3d}


def _input_to_channels_last(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of the root: the first argument, (B, C, *S) with 2 or 3 spatial axes, made channels-last."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() - 2 in _FORMAT:
        return (args[0].contiguous(memory_format=_FORMAT[args[0].dim() - 2]), *args[1:])
    return None


def _output_to_default(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook of the root: the logits (a tensor, or a list of them with deep supervision) back in the default
    layout, so that losses, metrics and the sliding window keep running on contiguous tensors."""
    if isinstance(output, torch.Tensor):
        return output.contiguous()
    if isinstance(output, list | tuple):
        return type(output)(o.contiguous() if isinstance(o, torch.Tensor) else o for o in output)
    return output


def use_channels_last(model: nn.Module) -> nn.Module:
    """Make every plain Conv/ConvTranspose (2D/3D) of `model` run channels-last, its input channels-last and its
    output contiguous again; in place (the modules keep their parameters), idempotent. Returns `model`."""
    for module in model.modules():
        swapped = _SWAP.get(type(module))
        if swapped is not None:
            module.__class__ = swapped
    if not getattr(model, "_distseg_channels_last", False):
        model.register_forward_pre_hook(_input_to_channels_last)
        model.register_forward_hook(_output_to_default)
        model._distseg_channels_last = True
    return model


def is_channels_last(model: nn.Module) -> bool:
    """Whether `use_channels_last` was applied to `model`."""
    return bool(getattr(model, "_distseg_channels_last", False))


def channels_last_wanted(setting: bool | str, spatial_dims: int, device_type: str) -> bool:
    """`model.channels_last` resolved: True / False as given; "auto" = a 3D model on the CPU (the measured case)."""
    if setting == "auto":
        return spatial_dims == 3 and device_type == "cpu"
    return bool(setting)
