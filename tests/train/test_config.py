"""Experiment config: YAML + dotted overrides, errors naming the dotted key, every file in configs/ loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distseg.config import ConfigError, ExperimentConfig, load_config, main, to_dict, write_resolved

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the tests name configs by checkout path (configs/X.yaml); names work anywhere


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_file_loads_and_validates(path: Path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    # the file's values won over the defaults, section by section
    for section, values in raw.items():
        for key, value in (values or {}).items():
            got = to_dict(getattr(getattr(cfg, section), key))
            if isinstance(value, dict) and isinstance(got, dict):
                assert {k: got[k] for k in value} == value, f"{path.name}: {section}.{key}"
            else:
                assert got == value, f"{path.name}: {section}.{key}"


def test_there_are_configs_for_every_model_and_mode():
    names = {p.stem for p in CONFIGS}
    for required in ("brats_unet3d", "brats_res_inception_unet3d", "demo", "debug", "debug_slice2d", "debug_image2d"):
        assert required in names
    for model in ("res_inception_unet", "resnet50_unet", "unet"):
        assert f"brats2d_{model}" in names and f"images2d_{model}" in names
        assert load_config(REPO / "configs" / f"brats2d_{model}.yaml").data.mode == "slice2d"
        assert load_config(REPO / "configs" / f"images2d_{model}.yaml").data.mode == "image2d"


def test_overrides_win_and_are_parsed_as_yaml():
    cfg = load_config("configs/debug.yaml", ["optim.lr=3e-4", "data.patch_size=[16,24,32]", "deepspeed.zero_stage=3",
                                             "model.overrides={deep_supervision: true}", "run.name=other"])
    assert cfg.optim.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string; the float field accepts it
    assert cfg.data.patch_size == (16, 24, 32)
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.model.overrides == {"deep_supervision": True}
    assert cfg.run_dir == Path("outputs/runs/other")


def test_defaults_apply_where_the_yaml_is_silent():
    cfg = load_config("configs/debug.yaml")
    assert cfg.optim.betas == ExperimentConfig().optim.betas
    assert cfg.train.max_nonfinite_in_row == 5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=0.1", "optim.lrr: unknown config key (did you mean optim.lr?)"),
        ("nosection.x=1", "nosection: unknown config key"),
        ("optim.lr=fast", "optim.lr: expected float"),
        ("optim.lr=-1", "optim.lr: expected a learning rate > 0"),
        ("train.steps=1.5", "train.steps: expected int"),
        ("train.steps=0", "train.steps: expected an int >= 1"),
        ("train.max_minutes=0", "train.max_minutes: expected minutes > 0 (or null = no budget)"),
        ("train.max_minutes=soon", "train.max_minutes: expected float | None"),
        ("train.budget_measure_steps=0", "train.budget_measure_steps: expected an int >= 1"),
        ("data.foreground_cache_mb=-1", "data.foreground_cache_mb: expected an int >= 0"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage: expected 0, 1, 2 or 3"),
        ("model.channels_last=sometimes", "model.channels_last: expected true, false or auto, got 'sometimes'"),
        ("model.channels_last=1", "model.channels_last: expected bool | str, got 1"),
        ("model.compile=fast", "model.compile: expected one of [False, True, 'reduce-overhead', 'max-autotune'"),
        ("optim.fused=maybe", "optim.fused: expected true, false or auto, got 'maybe'"),
        ("train.cudnn_benchmark=sometimes", "train.cudnn_benchmark: expected true, false or auto"),
        ("deepspeed.precision=fp8", "deepspeed.precision"),
        ("deepspeed.offload_param=true", "deepspeed.offload_param: expected zero_stage == 3"),
        ("deepspeed.preset=configs/deepspeed/nope.json", "deepspeed.preset: no DeepSpeed JSON"),
        ("optim.betas=[0.9]", "optim.betas: expected a list of 2 values"),
        ("data.patch_size=[32,32]", "data.patch_size: expected 3 positive ints for mode=patch3d"),
        ("data.batch_size=0", "data.batch_size"),
        ("model.name=vit", "model.name: expected one of"),
        ("model.name=unet", "model.name: unet is a 2D model but data.mode=patch3d"),
        ("model.overrides={bogus: 1}", "model.overrides:"),
        ("model.preset=huge", "model.preset:"),
        ("checkpoint.resume=sometimes", "checkpoint.resume"),
        ("checkpoint.upload_nice=20", "checkpoint.upload_nice: expected an int 0-19"),
        ("loss.name=focal", "loss.name"),
        ("monitor.log_every=0", "monitor.log_every"),
        ("optim=3", "optim: expected a mapping of OptimConfig fields"),
        ("optim.lr.x=3", "optim.lr: is a value, not a section"),
    ],
)
def test_bad_values_name_the_dotted_key(override: str, message: str):
    with pytest.raises(ConfigError) as err:
        load_config("configs/debug.yaml", [override])
    assert message in str(err.value)


def test_fused_adamw_is_refused_with_an_offloaded_optimizer():
    with pytest.raises(ConfigError, match="optim.fused: expected false or auto with deepspeed.offload_optimizer"):
        load_config("configs/debug.yaml", ["deepspeed.offload_optimizer=true", "optim.fused=true"])
    cfg = load_config("configs/debug.yaml", ["deepspeed.offload_optimizer=true", "model.compile=max-autotune"])
    assert cfg.optim.fused == "auto" and cfg.model.compile == "max-autotune"


def test_a_bad_key_in_a_file_names_the_file(tmp_path: Path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=rf"optim.lrr: unknown config key .*\[config file {bad}\]"):
        load_config(bad)


def test_bad_files_are_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=f"{bad}: expected a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config("configs/debug.yaml", ["optim.lr"])


def test_resolved_config_round_trips(tmp_path: Path):
    cfg = load_config("configs/debug.yaml", ["optim.lr=0.002", "data.store=/x/brats.zarr"])
    path = write_resolved(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    again = load_config(path)
    assert to_dict(again) == to_dict(cfg)


def test_check_cli_prints_resolved_config_or_the_error(capsys):
    assert main(["check", "configs/debug.yaml", "optim.lr=0.005"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.005 and printed["model"]["name"] == "unet3d"
    assert main(["check", "configs/debug.yaml", "train.val_every=-2"]) == 2
    assert "train.val_every" in capsys.readouterr().err


def test_a_resumed_run_names_the_keys_its_config_changed(tmp_path: Path, caplog):
    from distseg.config import write_resolved
    from distseg.train.trainer import warn_config_changes

    write_resolved(load_config("configs/debug.yaml"), tmp_path)
    assert warn_config_changes(tmp_path, load_config("configs/debug.yaml")) == []
    changed = warn_config_changes(tmp_path, load_config("configs/debug.yaml", ["optim.lr=0.5", "train.steps=40"]))
    assert changed == ["optim.lr: 0.01 -> 0.5", f"train.steps: {load_config('configs/debug.yaml').train.steps} -> 40"]
    assert "resuming" in caplog.text and "optim.lr: 0.01 -> 0.5" in caplog.text
