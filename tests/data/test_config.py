"""DataConfig / AugmentConfig validation: every error names the full dotted key."""

from __future__ import annotations

import dataclasses

import pytest

from distseg.data.config import AugmentConfig, DataConfig
from distseg.data.loader import open_store


def _cfg(**kw) -> DataConfig:
    return DataConfig(store="x.zarr", **kw)


def test_defaults_validate() -> None:
    _cfg().validate()
    _cfg(mode="slice2d", patch_size=(64, 64)).validate()
    _cfg(mode="image2d", patch_size=(64, 64), val_patch_size=(128, 128)).validate()


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        (DataConfig(), "data.store"),
        (_cfg(patch_size=(128, 128)), "data.patch_size: expected 3 positive ints for mode=patch3d, got [128, 128]"),
        (_cfg(mode="slice2d"), "data.patch_size: expected 2 positive ints for mode=slice2d"),
        (_cfg(mode="volume"), "data.mode"),
        (_cfg(val_patch_size=(8, 8)), "data.val_patch_size"),
        (_cfg(batch_size=0), "data.batch_size"),
        (_cfg(foreground_fraction=1.5), "data.foreground_fraction"),
        (_cfg(val_folds=(-1,)), "data.val_folds"),
        (_cfg(num_workers=-1), "data.num_workers"),
        (_cfg(target="softmax"), "data.target"),
        (_cfg(context_margin=-2), "data.context_margin"),
        (_cfg(augment=AugmentConfig(rotate_prob=2.0)), "data.augment.rotate_prob"),
        (_cfg(augment=AugmentConfig(scale_range=(1.4, 0.7))), "data.augment.scale_range"),
        (_cfg(augment=AugmentConfig(flip_axes=(3,))), "data.augment.flip_axes"),
        (_cfg(augment=AugmentConfig(gamma_range=(0.0, 1.0))), "data.augment.gamma_range"),
        (_cfg(augment=AugmentConfig(noise_std=-0.1)), "data.augment.noise_std"),
        (_cfg(augment=AugmentConfig(intensity_prob=1.5)), "data.augment.intensity_prob"),
        (_cfg(augment=AugmentConfig(split_factor_ranges=1)), "data.augment.split_factor_ranges"),
        (_cfg(augment=AugmentConfig(blur_prob=-0.1)), "data.augment.blur_prob"),
        (_cfg(augment=AugmentConfig(blur_sigma=(1.0, 0.5))), "data.augment.blur_sigma"),
        (_cfg(augment=AugmentConfig(blur_sigma=(0.5, 9.0))), "data.augment.blur_sigma"),
        (_cfg(augment=AugmentConfig(blur_channel_prob=2.0)), "data.augment.blur_channel_prob"),
        (_cfg(augment=AugmentConfig(contrast_prob=2.0)), "data.augment.contrast_prob"),
        (_cfg(augment=AugmentConfig(contrast_range=(-1.0, 1.0))), "data.augment.contrast_range"),
        (_cfg(augment=AugmentConfig(lowres_prob=2.0)), "data.augment.lowres_prob"),
        (_cfg(augment=AugmentConfig(lowres_zoom=(0.5, 2.0))), "data.augment.lowres_zoom"),
        (_cfg(augment=AugmentConfig(lowres_channel_prob=-1.0)), "data.augment.lowres_channel_prob"),
        (_cfg(augment=AugmentConfig(gamma_invert_prob=2.0)), "data.augment.gamma_invert_prob"),
        (_cfg(augment=AugmentConfig(gamma_retain_stats="yes")), "data.augment.gamma_retain_stats"),
        (_cfg(augment=AugmentConfig(elastic_prob=2.0)), "data.augment.elastic_prob"),
        (_cfg(augment=AugmentConfig(elastic_magnitude=(0.0, 0.9))), "data.augment.elastic_magnitude"),
        (_cfg(augment=AugmentConfig(elastic_points=1)), "data.augment.elastic_points"),
    ],
)
def test_errors_name_key(cfg: DataConfig, key: str) -> None:
    with pytest.raises(ValueError, match="^" + key.replace("[", r"\[").replace("]", r"\]")):
        cfg.validate()


def test_prefix_is_used() -> None:
    with pytest.raises(ValueError, match=r"^exp\.train_data\.augment\.noise_prob"):
        _cfg(augment=AugmentConfig(noise_prob=-1)).validate("exp.train_data")


def test_every_field_has_a_docstring() -> None:
    import inspect

    for cls in (DataConfig, AugmentConfig):
        src = inspect.getsource(cls)
        for f in dataclasses.fields(cls):
            after = src.split(f"    {f.name}:", 1)[1].split("\n", 2)[1]
            assert after.strip().startswith('"""'), f"{cls.__name__}.{f.name} has no docstring"


def test_mode_must_fit_store(brats_store, image_store) -> None:
    with pytest.raises(ValueError, match=r"^data\.mode: image2d needs a 2D image store"):
        open_store(DataConfig(store=str(brats_store), mode="image2d", patch_size=(8, 8)))
    with pytest.raises(ValueError, match=r"^data\.mode: patch3d needs a 3D store"):
        open_store(DataConfig(store=str(image_store), patch_size=(1, 8, 8)))
