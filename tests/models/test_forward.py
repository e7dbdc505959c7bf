"""Every registered model (debug preset): shapes at odd sizes, gradients, bf16 autocast, channels-last,
deep supervision and activation checkpointing."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from distseg.models import available_models, build_model

DEEP_SUPERVISED = ["unet3d", "res_inception_unet3d", "res_inception_unet"]
TWO_D = [n for n in available_models() if build_model(n, "debug").spatial_dims == 2]


def test_output_shape_at_odd_sizes(model_name: str, odd_input: Callable) -> None:
    model = build_model(model_name, "debug")
    x = odd_input(model)
    for mode in (True, False):
        model.train(mode)
        out = model(x)
        assert out.shape == (2, model.out_channels, *x.shape[2:]), f"{model_name} train={mode}"
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", TWO_D)
@pytest.mark.parametrize(("in_ch", "out_ch"), [(4, 3), (1, 2)])
def test_2d_models_take_any_channel_counts(name: str, in_ch: int, out_ch: int) -> None:
    model = build_model(name, "debug", in_channels=in_ch, out_channels=out_ch)
    assert model(torch.randn(1, in_ch, 33, 31)).shape == (1, out_ch, 33, 31)


def test_wrong_input_shape_is_a_clear_error() -> None:
    model = build_model("unet", "debug")
    with pytest.raises(ValueError, match=r"UNet expects input \(B, 3, S, S\), got shape \(1, 4, 32, 32\)"):
        model(torch.randn(1, 4, 32, 32))



@pytest.mark.parametrize("name", ["unet3d", "res_inception_unet3d"])
def test_instance_norm_bottleneck_of_one_voxel_is_a_clear_error(name: str) -> None:
    model = build_model(name, "debug").eval()
    s = model.total_stride
    with pytest.raises(ValueError, match=rf"larger than its total stride {s}.*got spatial size \({s}, {s}, {s - 3}\)"):
        model(torch.zeros(1, model.in_channels, s, s, s - 3))
    # one axis beyond the stride gives the bottleneck 2 voxels: fine
    assert model(torch.zeros(1, model.in_channels, s + 1, s, s)).shape[2:] == (s + 1, s, s)

def test_padding_is_cropped_back_consistently() -> None:
    """Output at an odd size equals the output of the explicitly zero-padded input, cropped (high-end padding)."""
    model = build_model("unet", "debug").eval()
    x = torch.randn(1, 3, 13, 6)
    padded = torch.nn.functional.pad(x, (0, 2, 0, 3))  # to 16×8, multiples of the total stride 4
    assert torch.allclose(model(x), model(padded)[..., :13, :6], atol=1e-6)


def test_gradients_reach_every_trainable_parameter(model_name: str, odd_input: Callable) -> None:
    model = build_model(model_name, "debug")
    out = model(odd_input(model))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"{model_name}: no gradient for {missing}"


def test_bf16_autocast_forward_on_cpu(model_name: str, odd_input: Callable) -> None:
    model = build_model(model_name, "debug")
    x = odd_input(model, batch=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (1, model.out_channels, *x.shape[2:])
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()
    out.float().mean().backward()


@pytest.mark.parametrize("name", TWO_D)
def test_channels_last_gives_same_result(name: str) -> None:
    model = build_model(name, "debug").eval()
    x = torch.randn(2, model.in_channels, 32, 32)
    ref = model(x)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    out = cl_model(x.to(memory_format=torch.channels_last))
    assert torch.allclose(ref, out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", DEEP_SUPERVISED)
def test_deep_supervision_outputs(name: str, odd_input: Callable) -> None:
    model = build_model(name, "debug", deep_supervision=True)
    x = odd_input(model)
    outs = model.train()(x)
    assert isinstance(outs, list) and len(outs) >= 2
    for k, out in enumerate(outs):
        expected = tuple(-(-s // 2**k) for s in x.shape[2:])  # ceil(size / 2**k)
        assert out.shape == (2, model.out_channels, *expected), f"{name} level {k}"
    sum(o.mean() for o in outs).backward()
    assert all(h.weight.grad is not None for h in model.heads)
    # Inference returns only the full-resolution logits.
    assert model.eval()(x).shape == (2, model.out_channels, *x.shape[2:])


def test_unet3d_deep_supervision_has_one_output_per_decoder_level() -> None:
    model = build_model("unet3d", "debug", deep_supervision=True)
    assert len(model.train()(torch.randn(1, 4, 16, 16, 16))) == len(model.cfg.features) - 1


def test_activation_checkpointing_changes_memory_not_results(model_name: str, odd_input: Callable) -> None:
    torch.manual_seed(0)
    plain = build_model(model_name, "debug")
    ckpt = copy.deepcopy(plain)
    ckpt.cfg.activation_checkpointing = True
    x = odd_input(plain)
    grads = []
    for model in (plain, ckpt):
        model.train()
        model(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4), f"{model_name}: grad {n} differs"
    # BatchNorm running stats move once per step, not twice (the recompute restores them).
    for (n, b0), (_, b1) in zip(plain.named_buffers(), ckpt.named_buffers(), strict=True):
        assert torch.allclose(b0.float(), b1.float(), atol=1e-6), f"{model_name}: buffer {n} differs"


def test_checkpointing_saves_activation_memory() -> None:
    """Saved-for-backward tensors shrink when stages are checkpointed (counted with saved-tensor hooks)."""

    def saved_bytes(model: torch.nn.Module) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(1, 4, 32, 32, 32)).mean()
        return total

    plain = saved_bytes(build_model("unet3d", "debug"))
    ckpt = saved_bytes(build_model("unet3d", "debug", activation_checkpointing=True))
    assert ckpt < plain / 2, (plain, ckpt)
