"""Summary: hook-counted FLOPs agree with torch's FlopCounterMode; the CLI runs and reports the model."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from distseg.models import build_model
from distseg.models.summary import summarize


def _shape(model: torch.nn.Module) -> tuple[int, ...]:
    return (model.in_channels, *((37, 45) if model.spatial_dims == 2 else (19, 23, 21)))


def test_conv_flops_match_flop_counter_mode(model_name: str) -> None:
    model = build_model(model_name, "debug").eval()
    shape = _shape(model)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    summary = summarize(model, shape, device="cpu")
    assert summary.conv_linear_flops == counter.get_total_flops() > 0
    assert summary.norm_flops > 0
    assert summary.params == sum(p.numel() for p in model.parameters())


def test_meta_device_summary_matches_cpu(model_name: str) -> None:
    cpu = summarize(build_model(model_name, "debug"), _shape(build_model(model_name, "debug")), device="cpu")
    with torch.device("meta"):
        meta_model = build_model(model_name, "debug")
    meta = summarize(meta_model, cpu.input_shape, device="meta")
    assert (meta.flops, meta.params, meta.output_shapes) == (cpu.flops, cpu.params, cpu.output_shapes)
    assert [(r.name, r.output_shape) for r in meta.rows] == [(r.name, r.output_shape) for r in cpu.rows]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distseg.models", *args], capture_output=True, text=True, timeout=120)


def test_summary_cli_prints_layers_shapes_params_flops() -> None:
    proc = _cli("summary", "unet", "--preset", "debug", "--input-shape", "3,37,45")
    assert proc.returncode == 0, proc.stderr
    n = sum(p.numel() for p in build_model("unet", "debug").parameters())
    assert f"parameters: {n:,}" in proc.stdout
    assert "output: [(1, 37, 45)]" in proc.stdout
    assert "FLOPs per sample (2×MACs)" in proc.stdout
    assert "ups.1.up" in proc.stdout and "ConvTranspose2d" in proc.stdout


def test_summary_cli_3d_default_input_and_errors() -> None:
    proc = _cli("summary", "unet3d", "--preset", "debug")
    assert proc.returncode == 0, proc.stderr
    assert "(4, 128, 128, 128)" in proc.stdout
    bad = _cli("summary", "vnet")
    assert bad.returncode != 0 and "unknown model 'vnet'" in bad.stderr
    bad_shape = _cli("summary", "unet", "--preset", "debug", "--input-shape", "4,32,32")
    assert bad_shape.returncode != 0 and "expected 3 channels" in bad_shape.stderr
