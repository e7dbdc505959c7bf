"""Registry: names, presets, override validation, and default-preset parameter counts (built on `meta`, not run)."""

from __future__ import annotations

import pytest
import torch

from distseg.models import available_models, build_model, model_config

# Ranges from issue #3; 3D models have no range there, their counts are recorded in .notes/models.md.
PARAM_RANGES = {
    "res_inception_unet": (60e6, 70e6),
    "resnet50_unet": (27e6, 33e6),
    "unet": (29.5e6, 32.5e6),
    "unet3d": (25e6, 35e6),
    "res_inception_unet3d": (4e6, 15e6),
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_registered_model_has_a_range() -> None:
    assert sorted(PARAM_RANGES) == available_models()


@pytest.mark.parametrize("name", sorted(PARAM_RANGES))
def test_default_parameter_count_in_range(name: str) -> None:
    with torch.device("meta"):
        model = build_model(name)
    lo, hi = PARAM_RANGES[name]
    assert lo <= n_params(model) <= hi, f"{name}: {n_params(model):,} params not in [{lo:,.0f}, {hi:,.0f}]"


def test_unet_matches_reference_count() -> None:
    """The reference (milesial) U-Net, bilinear=False, 3→1, has exactly 31,037,633 parameters."""
    with torch.device("meta"):
        assert n_params(build_model("unet", in_channels=3, out_channels=1)) == 31_037_633
        assert n_params(build_model("unet", bilinear=True)) == 17_262_977


def test_debug_presets_are_tiny(model_name: str) -> None:
    assert 1_000 <= n_params(build_model(model_name, "debug")) <= 500_000


def test_unknown_model_names_choices() -> None:
    with pytest.raises(KeyError, match=r"unknown model 'vnet'.*available models: .*unet3d"):
        build_model("vnet")


def test_unknown_preset_names_choices() -> None:
    with pytest.raises(KeyError, match=r"unknown preset 'huge'.*available presets: default, debug"):
        build_model("unet", preset="huge")


def test_unknown_override_key_names_key_and_valid_keys() -> None:
    expected = r"unknown config key\(s\) \['chanels'\] for model 'unet'.*valid keys: .*in_channels"
    with pytest.raises(TypeError, match=expected):
        build_model("unet", "debug", chanels=4)


def test_bad_override_value_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="freeze_encoder_stages must be in 0..5, got 7"):
        build_model("resnet50_unet", "debug", freeze_encoder_stages=7)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3, got 4"):
        build_model("unet", "debug", spatial_dims=4)
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        build_model("unet", "debug", norm="layer")


def test_overrides_apply_and_yaml_lists_become_tuples() -> None:
    cfg = model_config("unet3d", "debug", features=[4, 8], out_channels=5)
    assert cfg.features == (4, 8) and cfg.out_channels == 5
    model = build_model("unet3d", "debug", features=[4, 8], out_channels=5)
    assert model(torch.randn(1, 4, 8, 8, 8)).shape == (1, 5, 8, 8, 8)
