"""DeepSpeed config derivation (presets with "auto"), optimizers and LR schedules."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from distseg.config import ConfigError, load_config
from distseg.train.engine import build_ds_config, mixed_precision_batchnorm
from distseg.train.optim import ScheduleLength, build_optimizer, build_scheduler, lr_lambda, param_groups, refresh_lr

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


def test_lr_schedules_warm_up_then_decay_to_the_floor_at_the_last_step():
    cfg = load_config("configs/debug.yaml", ["optim.warmup_steps=4", "optim.min_lr_ratio=0.1"]).optim
    cosine = lr_lambda(cfg, total_steps=21)  # the update of step s+1 uses factor(s): s = 0..20
    assert [cosine(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert cosine(4) == pytest.approx(1.0)
    assert cosine(12) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert cosine(20) == pytest.approx(0.1) and cosine(100) == pytest.approx(0.1)  # the LAST update is at the floor
    assert cosine(19) > 0.1
    decay = [cosine(s) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    cfg.schedule, cfg.poly_power, cfg.min_lr_ratio = "poly", 0.9, 0.0
    poly = lr_lambda(cfg, total_steps=21)
    assert poly(12) == pytest.approx(0.5**0.9) and poly(20) == pytest.approx(0.0)
    short = lr_lambda(cfg, total_steps=5)  # 4 warm-up steps, then the last: straight to the floor
    assert [short(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.0])
    cfg.schedule = "constant"
    assert lr_lambda(cfg, 20)(15) == 1.0


def test_a_schedule_length_set_mid_run_moves_the_decay_and_the_current_lr():
    """What a wall-clock plan does: the schedule spans `train.steps` until the plan, then the planned steps."""
    cfg = load_config("configs/debug.yaml", ["optim.lr=0.1", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1"]).optim
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(cfg, param_groups(model, 0.0))
    length = ScheduleLength(1000)
    sched = build_scheduler(cfg, opt, length)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1, rel=1e-3)  # barely decayed over 1000 steps
    length.total = 9  # planned: 9 steps, 5 done
    assert refresh_lr(sched) == pytest.approx(opt.param_groups[0]["lr"])
    expected = lr_lambda(cfg, 9)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * expected(s) for s in range(5, 9)])
    assert lrs[-1] == pytest.approx(0.01)  # step 9, the last, runs at the floor


def test_gpu_preset_reduces_gradients_in_fp32_and_buffers_keep_their_dtype():
    cfg = load_config("configs/debug.yaml", ["deepspeed.preset=configs/deepspeed/zero_gpu.json"])
    ds = build_ds_config(cfg, 8)
    assert ds["communication_data_type"] == "fp32"
    assert "data_types" not in ds  # no buffer_dtype: BatchNorm statistics stay fp32 (mixed_precision_batchnorm)


@pytest.mark.parametrize("dims", [2, 3])
def test_batchnorm_keeps_fp32_statistics_under_bf16_weights(dims: int):
    """DeepSpeed bf16 casts parameters, not buffers; batch_norm refuses that mix unless the layer is converted."""
    bn_cls = torch.nn.BatchNorm2d if dims == 2 else torch.nn.BatchNorm3d
    torch.manual_seed(0)
    model = torch.nn.Sequential(bn_cls(4), torch.nn.ReLU(), bn_cls(4, momentum=None))
    ref = copy.deepcopy(model)
    x = torch.randn(3, 4, *(6,) * dims) * 3 + 1
    low = copy.deepcopy(model)
    for p in low.parameters():
        p.data = p.data.bfloat16()
    with pytest.raises(RuntimeError):  # what DeepSpeed's cast leaves without the conversion
        copy.deepcopy(low)(x.bfloat16())
    assert mixed_precision_batchnorm(low) == 2 and mixed_precision_batchnorm(low) == 0
    assert isinstance(low[0], bn_cls) and set(low.state_dict()) == set(ref.state_dict())
    for _ in range(3):
        out = low(x.bfloat16())
        ref(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and low[0].weight.grad.dtype == torch.bfloat16
    for a, b in zip(low.buffers(), ref.buffers(), strict=True):
        assert a.dtype == b.dtype  # running mean/var fp32, counter int64
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    low.eval(), ref.eval()
    torch.testing.assert_close(low(x.bfloat16()).float(), ref(x), rtol=5e-2, atol=5e-2)


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


def test_precision_auto_resolves_to_what_the_accelerator_runs_natively():
    """`auto` on this CPU: bf16 only when oneDNN has native bf16 (AVX512-BF16/AMX), else fp32; explicit values stay."""
    import torch

    from distseg.train.engine import native_precision, resolve_precision

    native = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    assert native_precision() == native
    cfg = load_config("configs/brats_budget.yaml")
    assert cfg.deepspeed.precision == "auto"
    assert resolve_precision(cfg).deepspeed.precision == native
    explicit = load_config("configs/debug.yaml", ["deepspeed.precision=fp16"])
    assert resolve_precision(explicit) is explicit
