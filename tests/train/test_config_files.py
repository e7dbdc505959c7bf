"""Shipped configs and DeepSpeed presets by name (distseg.config_files), from any working directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from distseg import config_files
from distseg.config import ConfigError, load_config
from distseg.train.engine import build_ds_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a directory with no configs/ folder: names must not resolve against it


def test_a_config_name_resolves_to_the_shipped_file_outside_the_checkout():
    assert config_files.resolve_config("brats_budget") == REPO / "configs" / "brats_budget.yaml"
    assert config_files.resolve_config("brats_budget.yaml") == REPO / "configs" / "brats_budget.yaml"
    assert config_files.resolve_config("configs/debug.yaml") == REPO / "configs" / "debug.yaml"
    cfg = load_config("brats_budget", ["data.store=/nowhere.zarr"])
    assert cfg.model.name == "unet3d" and cfg.deepspeed.preset == "zero"
    ds = build_ds_config(cfg, 2)  # the preset is read by name, not from the working directory
    shipped = json.loads((REPO / "configs" / "deepspeed" / "zero.json").read_text())
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    assert set(shipped) <= set(ds)  # every key of the shipped preset reached the DeepSpeed config


def test_every_shipped_config_and_preset_is_listed_and_every_config_names_a_preset_by_name():
    assert config_files.available_configs() == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert config_files.available_presets() == ["zero", "zero_gpu"]
    for name in config_files.available_configs():
        preset = load_config(name).deepspeed.preset
        assert preset in config_files.available_presets(), f"{name}: deepspeed.preset {preset!r} is not a name"


def test_an_existing_path_wins_over_a_shipped_name(tmp_path):
    own = tmp_path / "debug"  # a file literally named like a shipped config
    own.write_text((REPO / "configs" / "debug.yaml").read_text().replace("lr: ", "lr: 0.5 #"))
    assert config_files.resolve_config("debug") == Path("debug")
    mine = tmp_path / "my_preset.json"
    shutil.copy(REPO / "configs" / "deepspeed" / "zero.json", mine)
    assert config_files.resolve_preset(str(mine)) == mine
    # the form older run folders recorded
    assert config_files.resolve_preset("configs/deepspeed/zero.json") == REPO / "configs" / "deepspeed" / "zero.json"


def test_unknown_names_list_what_ships():
    with pytest.raises(ConfigError, match=r"nope: config file not found.*brats_budget"):
        load_config("nope")
    with pytest.raises(ConfigError, match=r"deepspeed.preset: no DeepSpeed JSON at 'nope'.*zero, zero_gpu"):
        load_config("debug", ["deepspeed.preset=nope"])


def test_an_installed_package_finds_its_own_copy(tmp_path, monkeypatch):
    """In a wheel the configs sit in distseg/configs/ (setup.py maps them there); that copy is used first."""
    pkg = tmp_path / "site" / "distseg"
    shutil.copytree(REPO / "configs", pkg / "configs")
    monkeypatch.setattr(config_files, "PACKAGE_DIR", pkg)
    assert config_files.configs_dir() == pkg / "configs"
    assert config_files.resolve_config("debug") == pkg / "configs" / "debug.yaml"
    assert config_files.resolve_preset("zero_gpu") == pkg / "configs" / "deepspeed" / "zero_gpu.json"
