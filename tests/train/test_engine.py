"""DeepSpeed config derivation (presets with "auto"), optimizers and LR schedules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distseg.config import ConfigError, load_config
from distseg.engine import build_ds_config
from distseg.optim import build_optimizer, build_scheduler, lr_lambda, param_groups

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.mark.parametrize("preset", ["", "configs/deepspeed/zero.json", "configs/deepspeed/zero_gpu.json"])
@pytest.mark.parametrize("world_size", [1, 2, 16])
def test_batch_sizes_precision_and_zero_come_from_the_experiment_config(preset: str, world_size: int):
    cfg = load_config("configs/debug.yaml", [f"deepspeed.preset={preset}", "data.batch_size=3", "train.grad_accum=4",
                                             "train.clip_grad=2.5", "deepspeed.zero_stage=3",
                                             "deepspeed.precision=fp16"])
    ds = build_ds_config(cfg, world_size)
    assert ds["train_batch_size"] == 3 * 4 * world_size
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 2.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False
    assert "auto" not in json.dumps(ds)
    if preset:  # the preset's own tuning knobs survive
        knobs = json.loads(Path(preset).read_text())["zero_optimization"]
        assert ds["zero_optimization"]["reduce_bucket_size"] == knobs["reduce_bucket_size"]


def test_offload_and_precision_switches():
    cfg = load_config("configs/debug.yaml", ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
                                             "deepspeed.offload_param=true", "deepspeed.precision=fp32"])
    ds = build_ds_config(cfg, 2)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "data_types" not in ds  # fp32: buffers stay as they are


def test_a_preset_that_disagrees_is_an_error(tmp_path: Path):
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": "auto"}))
    cfg = load_config("configs/debug.yaml", [f"deepspeed.preset={preset}", "deepspeed.zero_stage=2"])
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage is 1 but the experiment config implies 2"):
        build_ds_config(cfg, 2)
    preset.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="'optimizer' block"):
        build_ds_config(cfg, 2)
    preset.write_text(json.dumps({"flops_profiler": {"enabled": "auto"}}))
    with pytest.raises(ConfigError, match=r"flops_profiler\.enabled is \"auto\" but the experiment config does not"):
        build_ds_config(cfg, 2)
    preset.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read DeepSpeed JSON"):
        build_ds_config(cfg, 2)


def test_lr_schedules_warm_up_then_decay():
    cfg = load_config("configs/debug.yaml", ["optim.warmup_steps=4", "optim.min_lr_ratio=0.1"]).optim
    cosine = lr_lambda(cfg, total_steps=20)
    assert [cosine(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert cosine(4) == pytest.approx(1.0)
    assert cosine(12) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert cosine(20) == pytest.approx(0.1) and cosine(100) == pytest.approx(0.1)
    decay = [cosine(s) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    cfg.schedule, cfg.poly_power, cfg.min_lr_ratio = "poly", 0.9, 0.0
    poly = lr_lambda(cfg, total_steps=20)
    assert poly(12) == pytest.approx(0.5**0.9) and poly(20) == pytest.approx(0.0)
    cfg.schedule = "constant"
    assert lr_lambda(cfg, 20)(15) == 1.0


def test_optimizers_and_the_scheduler_drive_the_lr():
    model = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.InstanceNorm3d(4, affine=True))
    groups = param_groups(model, 1e-2)
    assert [len(g["params"]) for g in groups] == [1, 3]  # conv weight decays; conv bias + norm affine do not
    for name, kind in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)):
        cfg = load_config("configs/debug.yaml", [f"optim.name={name}", "optim.lr=0.1", "optim.warmup_steps=2"]).optim
        opt = build_optimizer(cfg, param_groups(model, cfg.weight_decay))
        assert isinstance(opt, kind)
        if name == "sgd":
            assert opt.defaults["nesterov"] and opt.defaults["momentum"] == cfg.momentum
        sched = build_scheduler(cfg, opt, total_steps=10)
        lrs = []
        for _ in range(4):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert lrs[:2] == pytest.approx([0.05, 0.1]) and lrs[3] < 0.1


def test_cpu_offload_optimizer_is_deepspeeds_cpu_adam():
    """ZeRO-Offload needs DeepSpeedCPUAdam (a C++ extension, JIT-built once into ~/.cache/torch_extensions)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    cfg = load_config("configs/debug.yaml", ["optim.lr=0.1"]).optim
    p = torch.nn.Parameter(torch.ones(8))
    opt = build_optimizer(cfg, [{"params": [p], "weight_decay": 0.0}], offload=True)
    assert isinstance(opt, DeepSpeedCPUAdam)
    p.grad = torch.ones(8)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((8,), 0.9), atol=1e-4)  # Adam's first step moves by lr
