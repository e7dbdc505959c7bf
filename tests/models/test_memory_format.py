"""Channels-last convolutions (`distseg.models.memory_format`): same outputs and gradients as the plain model, the
activations really channels-last, the parameters and state dict untouched (what DeepSpeed's flat buffers need)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distseg.models import available_models, build_model
from distseg.models.memory_format import channels_last_wanted, is_channels_last, use_channels_last


def _input(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    spatial = (32, 32, 32) if model.spatial_dims == 3 else (64, 64)
    return torch.randn(2, model.in_channels, *spatial)


@pytest.mark.parametrize("name", available_models())
def test_same_outputs_and_gradients_with_untouched_parameters(name: str) -> None:
    torch.manual_seed(0)
    plain = build_model(name, "debug")
    fast = use_channels_last(copy.deepcopy(plain))
    x = _input(plain)

    convs = [m for m in fast.modules() if isinstance(m, nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d |
                                                      nn.ConvTranspose3d)]
    assert convs and all(type(m).__name__.startswith("ChannelsLast") for m in convs)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, output) of every conv call, in call order
    for conv in convs:
        conv.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))

    ref, out = plain.train()(x), fast.train()(x)
    ref = ref[0] if isinstance(ref, list) else ref
    out = out[0] if isinstance(out, list) else out
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    fmt = torch.channels_last_3d if plain.spatial_dims == 3 else torch.channels_last
    # the model's input reached the first convolution channels-last, and convolutions ran channels-last (1x1
    # kernels and norms may hand on either layout: their outputs are not all channels-last)
    assert seen[0][0].is_contiguous(memory_format=fmt) and not seen[0][0].is_contiguous()
    assert any(o.is_contiguous(memory_format=fmt) and not o.is_contiguous() for _, o in seen)

    ref.square().mean().backward()
    out.square().mean().backward()
    for (k, p), (_, q) in zip(plain.named_parameters(), fast.named_parameters(), strict=True):
        assert q.is_contiguous(), k  # parameter storage untouched: ZeRO's flat-buffer views stay valid
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-3, msg=k)
    # the same state dict (names; values: BatchNorm statistics moved the same way in both)
    ref_state, state = plain.state_dict(), fast.state_dict()
    assert state.keys() == ref_state.keys()
    for k, v in state.items():
        torch.testing.assert_close(v, ref_state[k], atol=1e-4, rtol=1e-3, msg=k)


def test_idempotent_and_reported() -> None:
    model = build_model("unet3d", "debug")
    assert not is_channels_last(model)
    use_channels_last(use_channels_last(model))
    assert is_channels_last(model) and len(model._forward_pre_hooks) == 1


def test_auto_means_3d_models_on_the_cpu() -> None:
    assert channels_last_wanted("auto", 3, "cpu") and not channels_last_wanted("auto", 2, "cpu")
    assert not channels_last_wanted("auto", 3, "cuda")
    assert channels_last_wanted(True, 2, "cuda") and not channels_last_wanted(False, 3, "cpu")
