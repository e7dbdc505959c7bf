"""Packaging beyond what pyproject.toml can say: the top-level `configs/` folder ships inside the wheel.

`configs/` stays where the user put it (beside `distseg/`, edited in place, used by `deepspeed launch/train.py
--config configs/X.yaml` in a checkout). The wheel carries it as the data package `distseg/configs/` (YAMLs + the
DeepSpeed presets in `deepspeed/`), where `distseg.config_files` looks first, so `--config brats_budget` and
`deepspeed.preset: zero` work wherever distseg is installed. Everything else is declared in pyproject.toml.
"""

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["distseg", "distseg.*", "preprocess", "preprocess.*", "launch", "launch.*"])

setup(
    packages=[*PACKAGES, "distseg.configs", "distseg.configs.deepspeed"],
    package_dir={"distseg.configs": "configs"},
    package_data={"distseg.configs": ["*.yaml"], "distseg.configs.deepspeed": ["*.json"]},
)
