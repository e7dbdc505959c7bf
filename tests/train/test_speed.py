"""Speed switches (`distseg.train.speed`): cuDNN autotuning, fused AdamW and torch.compile resolve as documented, and
a compiled run with the fused optimizer trains what the eager run trains, with checkpoints an uncompiled model
loads (world of one, real DeepSpeed engine, real inductor compilation on the CPU)."""

from __future__ import annotations

import pytest
import torch

from distseg.train.monitor import read_events
from distseg.train.speed import compile_kwargs, cudnn_benchmark_wanted, fused_wanted

DEBUG = "configs/debug.yaml"


def test_switches_resolve_auto_by_device_and_offload():
    assert cudnn_benchmark_wanted("auto", "cuda") and not cudnn_benchmark_wanted("auto", "cpu")
    assert cudnn_benchmark_wanted(True, "cpu") and not cudnn_benchmark_wanted(False, "cuda")
    assert fused_wanted("auto", "cuda", offload=False) and not fused_wanted("auto", "cpu", offload=False)
    assert fused_wanted(True, "cpu", offload=False)
    assert not fused_wanted("auto", "cuda", offload=True)  # DeepSpeed's CPU Adam runs the offloaded step
    assert compile_kwargs(False) is None
    assert compile_kwargs(True) == {"dynamic": False}
    assert compile_kwargs("max-autotune") == {"dynamic": False, "mode": "max-autotune"}


def _module_state(run_dir) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def test_compiled_run_with_fused_adamw_trains_like_the_eager_run(runner, brats_store, tmp_path):
    common = [f"data.store={brats_store}", f"run.output_root={tmp_path}", "train.steps=4", "train.val_every=4",
              "checkpoint.every=4", "deepspeed.precision=fp32", "monitor.image_every=0", "model.channels_last=false"]
    eager = runner.ok(runner.run(runner.single_cmd(DEBUG, [*common, "run.name=eager", "optim.fused=false"])))
    assert "torch.compile" not in eager and "fused kernel" not in eager
    out = runner.ok(runner.run(runner.single_cmd(DEBUG, [*common, "run.name=compiled", "model.compile=true",
                                                         "optim.fused=true"])))
    assert "torch.compile of the model (model.compile=True" in out
    assert "optimizer AdamW (fused kernel)" in out
    ev_eager, ev_comp = read_events(tmp_path / "runs" / "eager" / "tb"), read_events(tmp_path / "runs" / "compiled" /
                                                                                     "tb")
    loss_eager, loss_comp = dict(ev_eager["train/loss"]), dict(ev_comp["train/loss"])
    assert sorted(loss_comp) == [1, 2, 3, 4]
    for step, value in loss_eager.items():  # same batches, same weights: equal up to summation order
        assert loss_comp[step] == pytest.approx(value, rel=1e-4, abs=1e-5), step
    for region in ("WT", "TC", "ET"):  # whole-case validation ran through the compiled module in eval mode
        assert ev_comp[f"val/dice/{region}"][-1][1] == pytest.approx(ev_eager[f"val/dice/{region}"][-1][1], abs=2e-3)
    # compiled in place: the checkpoint's keys are the plain model's, so prediction and export load it as they are
    a, b = _module_state(tmp_path / "runs" / "eager"), _module_state(tmp_path / "runs" / "compiled")
    assert list(a) == list(b) and not any("_orig_mod" in k for k in b)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-3
