"""Model zoo: plain `nn.Module` segmentation networks built by name (no parallelism or precision code here).

    from distseg.models import build_model, available_models
    model = build_model("unet3d", preset="debug", deep_supervision=True)
"""

from distseg.models.base import SegmentationModel
from distseg.models.plain_unet import PlainUNet, PlainUNetConfig
from distseg.models.registry import ModelSpec, available_models, build_model, get_spec, model_config, register
from distseg.models.res_inception_unet import ResInceptionUNet, ResInceptionUNetConfig
from distseg.models.resnet_unet import ResNetUNet, ResNetUNetConfig
from distseg.models.unet import UNet, UNetConfig

__all__ = [
    "ModelSpec",
    "PlainUNet",
    "PlainUNetConfig",
    "ResInceptionUNet",
    "ResInceptionUNetConfig",
    "ResNetUNet",
    "ResNetUNetConfig",
    "SegmentationModel",
    "UNet",
    "UNetConfig",
    "available_models",
    "build_model",
    "get_spec",
    "model_config",
    "register",
]
