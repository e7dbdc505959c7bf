"""Per-layer summary of a model: output shapes, parameters and FLOPs per sample, from forward hooks.

FLOP convention: FLOPs = 2 × multiply-accumulates (MACs). Counted on
  - Conv / ConvTranspose (bias ignored): 2 · MACs, the same convention as torch.utils.flop_counter.FlopCounterMode,
    which the tests cross-check against;
  - Linear: 2 · in_features · output elements;
  - BatchNorm / GroupNorm / InstanceNorm: 2 per output element (normalise-and-scale folds into one multiply-add;
    computing the statistics is ignored).
Activations, pooling, concatenation and additions are not counted. Runs on the `meta` device by default, so a
summary of a 128³ 3D network costs no memory or time: only shapes are needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm)
_SKIP = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout)


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    flops: int


@dataclass
class ModelSummary:
    input_shape: tuple[int, ...]
    """(C, *spatial) of one sample."""
    output_shapes: list[tuple[int, ...]]
    rows: list[LayerRow] = field(default_factory=list)
    params: int = 0
    trainable_params: int = 0
    conv_linear_flops: int = 0
    """FLOPs per sample of conv, transposed conv and linear layers (2 × MACs)."""
    norm_flops: int = 0
    """FLOPs per sample of normalisation layers (2 per element)."""

    @property
    def flops(self) -> int:
        return self.conv_linear_flops + self.norm_flops


def layer_flops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
    """(conv/linear FLOPs, norm FLOPs) of one call of `module` on `inp` giving `out` (whole batch)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        k = math.prod(module.kernel_size)
        if module.transposed:
            # Each input element is multiplied by (out_channels / groups) · k weights.
            macs = inp.numel() * (module.out_channels // module.groups) * k
        else:
            macs = out.numel() * (module.in_channels // module.groups) * k
        return 2 * macs, 0
    if isinstance(module, nn.Linear):
        return 2 * out.numel() * module.in_features, 0
    if isinstance(module, _NORMS):
        return 0, 2 * out.numel()
    return 0, 0


def summarize(model: nn.Module, input_shape: tuple[int, ...], device: str | torch.device = "meta") -> ModelSummary:
    """Run one sample of shape (1, *input_shape) through `model` in eval mode and collect per-layer rows.

    `model` must live on `device` (build it under `with torch.device("meta"):` for the default).
    """
    summary = ModelSummary(input_shape=tuple(input_shape), output_shapes=[])
    seen: set[int] = set()
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, args: tuple, out: object) -> None:
        if not isinstance(out, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
            return
        conv_f, norm_f = layer_flops(module, args[0], out)
        summary.conv_linear_flops += conv_f
        summary.norm_flops += norm_f
        if isinstance(module, _SKIP):
            return
        params = 0 if id(module) in seen else sum(p.numel() for p in module.parameters(recurse=False))
        seen.add(id(module))
        row = LayerRow(names.get(module, "?"), type(module).__name__, tuple(out.shape[1:]), params, conv_f + norm_f)
        summary.rows.append(row)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    outs = out if isinstance(out, list) else [out]
    summary.output_shapes = [tuple(o.shape[1:]) for o in outs]
    summary.params = sum(p.numel() for p in model.parameters())
    summary.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return summary


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_summary(summary: ModelSummary, title: str = "") -> str:
    """A fixed-width text table, one line per layer call, then totals."""
    width = max([len(r.name) for r in summary.rows] + [10])
    lines = [title] if title else []
    header = f"{'layer':<{width}}  {'type':<16} {'output shape':<24} {'params':>10} {'FLOPs':>10}"
    lines += [header, "-" * len(header)]
    for r in summary.rows:
        shape = "×".join(map(str, r.output_shape))
        lines.append(f"{r.name:<{width}}  {r.kind:<16} {shape:<24} {r.params:>10,} {_fmt(r.flops):>10}")
    lines.append("-" * len(header))
    lines.append(f"input (C, *spatial): {summary.input_shape}  output: {summary.output_shapes}")
    lines.append(f"parameters: {summary.params:,} ({summary.trainable_params:,} trainable)")
    lines.append(
        f"FLOPs per sample (2×MACs): {_fmt(summary.flops)} = conv/linear {_fmt(summary.conv_linear_flops)}"
        f" + norm {_fmt(summary.norm_flops)}"
    )
    return "\n".join(lines)
