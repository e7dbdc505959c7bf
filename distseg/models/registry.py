"""Model registry: `build_model(name, preset, **overrides)` and `available_models()`.

Each entry pairs a typed config dataclass with a builder and named presets: `default` (the full-size model) and
`debug` (a few thousand to a few hundred thousand parameters, fast on CPU, used by every test).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from distseg.models.plain_unet import PlainUNet, PlainUNetConfig
from distseg.models.res_inception_unet import ResInceptionUNet, ResInceptionUNetConfig
from distseg.models.resnet_unet import ResNetUNet, ResNetUNetConfig
from distseg.models.unet import UNet, UNetConfig


@dataclass(frozen=True)
class ModelSpec:
    """One registered model: its config class, builder, and presets (preset name → config field values)."""

    name: str
    config_cls: type
    build: Callable[[Any], nn.Module]
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    if "default" not in spec.presets or "debug" not in spec.presets:
        raise ValueError(f"model {spec.name!r} must define 'default' and 'debug' presets")
    _REGISTRY[spec.name] = spec
    return spec


def available_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; available models: {', '.join(available_models())}")
    return _REGISTRY[name]


def model_config(name: str, preset: str = "default", **overrides: Any) -> Any:
    """The resolved config dataclass for `name`/`preset` with `overrides` applied (validated by the dataclass)."""
    spec = get_spec(name)
    if preset not in spec.presets:
        raise KeyError(f"unknown preset {preset!r} for model {name!r}; available presets: {', '.join(spec.presets)}")
    valid = [f.name for f in dataclasses.fields(spec.config_cls)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise TypeError(
            f"unknown config key(s) {unknown} for model {name!r} ({spec.config_cls.__name__}); "
            f"valid keys: {', '.join(valid)}"
        )
    values = {**spec.presets[preset], **overrides}
    # YAML gives lists where the dataclasses want tuples.
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return spec.config_cls(**values)


def build_model(name: str, preset: str = "default", **overrides: Any) -> nn.Module:
    """Build registered model `name` from `preset` with config `overrides`.

    Raises KeyError for an unknown model or preset and TypeError for an unknown override key, naming the valid
    choices; value errors come from the config dataclass's own checks.
    """
    return get_spec(name).build(model_config(name, preset, **overrides))


register(
    ModelSpec(
        name="res_inception_unet",
        config_cls=ResInceptionUNetConfig,
        build=ResInceptionUNet,
        presets={
            "default": {},
            "debug": {"encoder_channels": (8, 16), "bottleneck_channels": 32, "branch_ratio": 0.5, "norm": "group"},
        },
        description="2D residual-inception U-Net, encoder 128-1024, bottleneck 2048 (65.8M params)",
    )
)
register(
    ModelSpec(
        name="res_inception_unet3d",
        config_cls=ResInceptionUNetConfig,
        build=ResInceptionUNet,
        presets={
            "default": {
                "spatial_dims": 3, "in_channels": 4, "out_channels": 3, "encoder_channels": (32, 64, 128, 256),
                "bottleneck_channels": 320, "branch_ratio": 0.5, "norm": "instance", "activation": "leaky_relu",
            },
            "debug": {
                "spatial_dims": 3, "in_channels": 4, "out_channels": 3, "encoder_channels": (4, 8),
                "bottleneck_channels": 16, "branch_ratio": 0.5, "norm": "instance", "activation": "leaky_relu",
            },
        },
        description="3D residual-inception U-Net for 128³ BraTS patches, 32-256 + bottleneck 320 (7.8M params)",
    )
)
register(
    ModelSpec(
        name="resnet50_unet",
        config_cls=ResNetUNetConfig,
        build=ResNetUNet,
        presets={
            "default": {},
            "debug": {"encoder_layers": (1, 1, 1, 1), "encoder_width": 4, "decoder_channels": (32, 16, 8, 8, 4)},
        },
        description="2D U-Net on a torchvision-compatible ResNet-50 encoder, transposed-conv decoder (30.5M params)",
    )
)
register(
    ModelSpec(
        name="unet",
        config_cls=UNetConfig,
        build=UNet,
        presets={"default": {}, "debug": {"features": (4, 8, 16)}},
        description="Ronneberger U-Net 64-1024, BN+ReLU, transposed convs (31.0M params for 3→1)",
    )
)
register(
    ModelSpec(
        name="unet3d",
        config_cls=PlainUNetConfig,
        build=PlainUNet,
        presets={"default": {}, "debug": {"features": (4, 8, 16)}},
        description="nnU-Net-style 3D U-Net for BraTS, features 32-320, 6 stages (31.2M params)",
    )
)
