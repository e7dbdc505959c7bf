"""End-to-end training through the REAL launcher: `deepspeed --num_gpus 2 launch/train.py` = 2 CPU ranks over gloo.

Few launches, many assertions each (every launch costs ~15 s of start-up on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from distseg.config import load_config, to_dict
from distseg.core import exit_codes
from distseg.train.monitor import read_events

pytestmark = pytest.mark.slow

DEBUG = "configs/debug.yaml"


def common(store: Path, out: Path, name: str, *more: str) -> list[str]:
    return [f"data.store={store}", f"run.output_root={out}", f"run.name={name}", *more]


def markers(ckpt_dir: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "COMPLETE.json").read_text()) for d in sorted(ckpt_dir.glob("step_*"))
            if (d / "COMPLETE.json").exists()}


def fp32_weights(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def test_zero2_bf16_with_grad_accum_trains_logs_validates_checkpoints_and_skips_a_nan(runner, brats_store, tmp_path):
    out = runner.ok(runner.run(runner.launcher_cmd(DEBUG, common(
        brats_store, tmp_path, "z2", "deepspeed.zero_stage=2", "deepspeed.precision=bf16", "train.steps=12",
        "train.grad_accum=2", "train.val_every=4", "checkpoint.every=2", "checkpoint.keep_last=1",
        "debug.inject_nan_at_step=3", "debug.inject_nan_times=1"))))
    run_dir = tmp_path / "runs" / "z2"

    # the loss falls (mean of the first vs the last three logged steps)
    ev = read_events(run_dir / "tb")
    first, last = runner.first_last_mean(ev["train/loss"])
    assert last < first, f"loss did not fall: {first:.4f} -> {last:.4f}"
    # every scalar family the issue asks for, at every logged step
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/samples_per_s", "perf/voxels_per_s",
                "perf/data_wait_fraction", "perf/step_time_s", "memory/host_rss_mib"):
        assert [s for s, _ in ev[tag]] == list(range(1, 13)), tag
    assert all(0.0 <= v <= 1.0 for _, v in ev["perf/data_wait_fraction"])
    lr = [v for _, v in ev["train/lr"]]  # the LR each step's update used
    assert lr[:2] == pytest.approx([0.005, 0.01])  # warm-up to the peak ...
    assert lr[-1] == pytest.approx(0.0, abs=1e-9) and lr[-2] > 0  # ... cosine to the floor AT the last step
    # validation Dice per region from all-reduced counts, and an overlay image (GT | prediction)
    for region in ("WT", "TC", "ET", "mean"):
        assert [s for s, _ in ev[f"val/dice/{region}"]] == [4, 8, 12]
        assert all(0.0 <= v <= 1.0 for _, v in ev[f"val/dice/{region}"])
    steps, images = zip(*ev["val/overlay"], strict=True)
    assert steps == (4, 8, 12) and images[0].ndim == 3 and images[0].shape[2] == 3 and images[0].std() > 0
    # the injected NaN (rank 0 only) made DeepSpeed skip that optimizer step on BOTH ranks; counted, training went on
    assert ev["train/nonfinite_skipped"][-1][1] == 1.0
    assert "non-finite loss or gradients on some rank; optimizer step skipped" in out
    assert "non-finite check: per optimizer step" in out

    # checkpoints: all complete, the pointer is the last one, pruned to keep_last=1 + best
    ckpt = run_dir / "checkpoints"
    done = markers(ckpt)
    assert (ckpt / "latest").read_text() == "step_00000012"
    best = (ckpt / "best").read_text()
    assert set(done) == {"step_00000012", best}
    assert all(m["world_size"] == 2 for m in done.values())
    # "best" is a validated step (saves every 2 steps, validations every 4) and its Dice is that step's
    assert done[best]["val_step"] == done[best]["step"] and done[best]["step"] % 4 == 0
    dice_at = dict(ev["val/dice/mean"])
    assert done[best]["val_dice"] == pytest.approx(dice_at[done[best]["step"]], rel=1e-6)  # TB: float32
    assert done[best]["val_dice"] == pytest.approx(max(dice_at.values()), rel=1e-6)
    state = json.loads((ckpt / "step_00000012" / "trainer_state.json").read_text())
    # 12 steps x 2 accumulated micro-batches, plus the 2 of the skipped step; samples of applied steps on 2 ranks
    assert state["counters"]["micro_batches"] == 26
    assert state["counters"]["samples_seen"] == 12 * 2 * 2 * 2
    assert state["counters"]["nonfinite_skipped"] == 1
    assert sorted(p.name for p in (ckpt / "step_00000012").glob("rng_rank*.pt")) == ["rng_rank00000.pt",
                                                                                     "rng_rank00001.pt"]
    # the resolved config is in the run folder and reproduces the run's settings
    resolved = load_config(run_dir / "config.yaml")
    assert resolved.train.grad_accum == 2 and resolved.data.store == str(brats_store)
    assert state["config"] == to_dict(resolved)


def test_exact_resume_after_sigkill_ignores_an_interrupted_save(runner, brats_store, tmp_path):
    """ZeRO-3 fp32: 8 steps straight == 4 steps, SIGKILL, resume to 8 (with a half-written newer tag lying around)."""
    args = ["deepspeed.zero_stage=3", "deepspeed.precision=fp32", "train.steps=8", "train.val_every=4",
            "checkpoint.every=4", "checkpoint.keep_last=3"]
    ref = runner.run(runner.launcher_cmd(DEBUG, common(brats_store, tmp_path, "ref", *args)))
    runner.ok(ref)
    ref_ckpt = tmp_path / "runs" / "ref" / "checkpoints"
    first, last = runner.first_last_mean(read_events(tmp_path / "runs" / "ref" / "tb")["train/loss"])
    assert last < first, f"ZeRO-3 fp32 loss did not fall: {first:.4f} -> {last:.4f}"

    # the same run, killed (whole process group, SIGKILL) as soon as its step-4 checkpoint is complete
    ckpt = tmp_path / "runs" / "resumed" / "checkpoints"
    proc = runner.start(runner.launcher_cmd(DEBUG, common(brats_store, tmp_path, "resumed", *args)),
                        tmp_path / "killed.log")
    runner.wait_for(ckpt / "step_00000004" / "COMPLETE.json", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (ckpt / "step_00000008" / "COMPLETE.json").exists(), "the run finished before it could be killed"

    # a newer save interrupted mid-way: shards copied, one cut in half, no COMPLETE.json
    debris = ckpt / "step_00000006"
    shutil.rmtree(debris, ignore_errors=True)
    shutil.copytree(ckpt / "step_00000004", debris)
    (debris / "COMPLETE.json").unlink()
    shard = next(debris.glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    out = runner.ok(runner.run(runner.launcher_cmd(DEBUG, common(brats_store, tmp_path, "resumed", *args))))
    assert "resumed from checkpoint step_00000004 (step 4, written by 2 ranks)" in out
    # (a 3D model on the CPU: model.channels_last=auto ran the convolutions channels-last with ZeRO-3's gathered
    # parameters, and the resume below is still exact)
    assert "channels-last convolutions (model.channels_last=auto)" in out
    assert not debris.exists(), "the incomplete tag should be pruned once a newer checkpoint is complete"

    a, b = fp32_weights(ref_ckpt, "step_00000008"), fp32_weights(ckpt, "step_00000008")
    assert a.keys() == b.keys() and len(a) > 0
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run by up to {worst}"
    # and they did train: step 8 differs from step 4
    c = fp32_weights(ckpt, "step_00000004")
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-4


def test_nonfinite_losses_in_a_row_stop_the_run_keeping_the_last_good_checkpoint(runner, brats_store, tmp_path):
    """ZeRO-3 bf16: trains 8 steps (loss falls), then 3 NaN micro-batches in a row on rank 0 stop every rank."""
    res = runner.run(runner.launcher_cmd(DEBUG, common(
        brats_store, tmp_path, "nan", "deepspeed.zero_stage=3", "deepspeed.precision=bf16", "train.steps=12",
        "train.val_every=0", "checkpoint.every=4", "debug.inject_nan_at_step=8", "debug.inject_nan_times=3",
        "train.max_nonfinite_in_row=3")))
    assert res.returncode == exit_codes.DIVERGED, res.stdout[-3000:]
    assert "3 consecutive optimizer steps were skipped as non-finite at step 8" in res.stdout
    ckpt = tmp_path / "runs" / "nan" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000008"
    assert set(markers(ckpt)) == {"step_00000004", "step_00000008"}
    first, last = runner.first_last_mean(read_events(tmp_path / "runs" / "nan" / "tb")["train/loss"])
    assert last < first, f"ZeRO-3 bf16 loss did not fall: {first:.4f} -> {last:.4f}"


def test_two_simulated_nodes_train_together_and_a_rank_count_that_breaks_the_batch_is_refused(runner, brats_store,
                                                                                             tmp_path):
    """`deepspeed --hostfile H --no_ssh --node_rank R` twice on this machine = a 2-node job (ZeRO-2 fp32)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = runner.free_port()
    overrides = common(brats_store, tmp_path, "nodes", "deepspeed.zero_stage=2", "deepspeed.precision=fp32",
                       "train.steps=8", "train.val_every=8", "checkpoint.every=8")
    procs = []
    for node in (0, 1):
        cmd = [runner.launcher_cmd(DEBUG, [])[0], "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", str(port), "launch/train.py", "--config", DEBUG,
               *overrides]
        # each "node" has 1 rank but sees both cores: one thread each keeps them from oversubscribing
        procs.append(runner.start(cmd, tmp_path / f"node{node}.log", OMP_NUM_THREADS="1"))
    for node, proc in enumerate(procs):
        try:
            rc = proc.wait(timeout=300)
        except Exception:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            raise
        assert rc == 0, (tmp_path / f"node{node}.log").read_text()[-5000:]
    log0 = (tmp_path / "node0.log").read_text()
    assert "nnodes=2, num_local_procs=1, node_rank=0" in log0
    assert "train loader rank 0/2" in log0
    done = markers(tmp_path / "runs" / "nodes" / "checkpoints")
    assert done["step_00000008"]["world_size"] == 2
    assert set(done["step_00000008"]["files"]) >= {"rng_rank00000.pt", "rng_rank00001.pt"}
    first, last = runner.first_last_mean(read_events(tmp_path / "runs" / "nodes" / "tb")["train/loss"])
    assert last < first, f"ZeRO-2 fp32 loss did not fall: {first:.4f} -> {last:.4f}"

    # (a 2-rank checkpoint resumed on 1 or 3 ranks: tests/train/test_fault.py)
    # a rank count that cannot keep the global batch is refused before distributed init, naming what would
    res = runner.run(runner.launcher_cmd(DEBUG, [*overrides, "train.steps=12"], num_gpus=3))
    assert res.returncode != 0
    assert "a rank count in [1, 2] with data.batch_size=2" in res.stdout
    # exporting the weights of a checkpoint for a NEW run still works
    tag_dir = tmp_path / "runs" / "nodes" / "checkpoints" / "step_00000008"
    # ...and the way out it names works: consolidate the shards, start a 1-rank run from those weights
    weights = tmp_path / "export" / "weights.pt"
    runner.ok(runner.run([sys.executable, "-m", "distseg.core.checkpoint", "export", str(tag_dir), str(weights)]))
    init = [*overrides, "run.name=from_nodes", f"model.init_weights={weights}", "train.steps=2",
            "train.val_every=0", "checkpoint.every=0"]
    out = runner.ok(runner.run(runner.single_cmd(DEBUG, init)))
    assert "initial weights from" in out
    warm = read_events(tmp_path / "runs" / "from_nodes" / "tb")["train/loss"][0][1]
    assert warm < first, f"a run started from trained weights should begin below a fresh run ({warm} vs {first})"


def test_2d_modes_and_cpu_offload_train_in_one_process(runner, brats_store, images2d_store, tmp_path):
    """`python launch/train.py` without the launcher is a world of one: BraTS slices, 2D images, ZeRO-Offload."""
    runs = [
        ("configs/debug_slice2d.yaml", brats_store, "slice2d", ["train.steps=3"], ["WT", "TC", "ET"]),
        ("configs/debug_image2d.yaml", images2d_store, "image2d", ["train.steps=3", "deepspeed.precision=bf16"],
         ["tumour"]),
        (DEBUG, brats_store, "offload", ["train.steps=3", "deepspeed.offload_optimizer=true"], ["WT", "TC", "ET"]),
        # ZeRO 0 fp32 has no gradient check of DeepSpeed's: the trainer checks each micro-batch instead
        (DEBUG, brats_store, "zero0", ["train.steps=3", "deepspeed.zero_stage=0", "deepspeed.precision=fp32",
                                       "debug.inject_nan_at_step=1"], ["WT", "TC", "ET"]),
    ]
    for config, store, name, extra, regions in runs:
        runner.ok(runner.run(runner.single_cmd(config, common(store, tmp_path, name, "train.val_every=3",
                                                              "checkpoint.every=3", *extra))))
        ev = read_events(tmp_path / "runs" / name / "tb")
        assert len(ev["train/loss"]) == 3, name
        for region in regions:
            assert ev[f"val/dice/{region}"][-1][0] == 3, name
        assert markers(tmp_path / "runs" / name / "checkpoints")["step_00000003"]["world_size"] == 1
    state = json.loads((tmp_path / "runs" / "zero0" / "checkpoints" / "step_00000003" / "trainer_state.json")
                       .read_text())
    assert state["counters"]["nonfinite_skipped"] == 1 and state["counters"]["micro_batches"] == 4
    # bf16 unet (BatchNorm): DeepSpeed holds the weights in bf16, the running statistics stay fp32
    module = torch.load(tmp_path / "runs" / "image2d" / "checkpoints" / "step_00000003" /
                        "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    stats = {k: v.dtype for k, v in module.items() if k.endswith(("running_mean", "running_var"))}
    assert stats and set(stats.values()) == {torch.float32}


def test_bad_input_stops_before_training_with_a_clear_message(runner, brats_store, tmp_path):
    # through the real launcher: every rank refuses the config, the launcher exits non-zero
    res = runner.run(runner.launcher_cmd(DEBUG, common(brats_store, tmp_path, "bad", "optim.lr=-0.1")))
    assert res.returncode != 0 and "optim.lr: expected a learning rate > 0, got -0.1" in res.stdout
    assert not (tmp_path / "runs" / "bad").exists()

    missing = tmp_path / "nowhere.zarr"
    res = runner.run(runner.single_cmd(DEBUG, common(missing, tmp_path, "bad")))
    assert res.returncode == 2 and f"{missing}: not a Zarr v3 store" in res.stdout

    wrong = tmp_path / "old.zarr"
    wrong.mkdir()
    meta = json.loads((brats_store / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 999
    (wrong / "zarr.json").write_text(json.dumps(meta))
    res = runner.run(runner.single_cmd(DEBUG, common(wrong, tmp_path, "bad")))
    assert res.returncode == 2 and f"{wrong}: store format_version 999 but this reader expects" in res.stdout

    res = runner.run(runner.single_cmd(DEBUG, common(brats_store, tmp_path, "bad", "model.name=unet")))
    assert res.returncode == 2 and "model.name: unet is a 2D model but data.mode=patch3d" in res.stdout

    res = runner.run(runner.single_cmd(DEBUG, common(brats_store, tmp_path, "bad",
                                                     "model.overrides={out_channels: 1}")))
    assert res.returncode == 2 and "model.overrides.out_channels: 1 but the store" in res.stdout

    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():  # DeepSpeed's CPU accelerator has no fp16
        res = runner.run(runner.single_cmd(DEBUG, common(brats_store, tmp_path, "bad", "deepspeed.precision=fp16")))
        assert res.returncode == 2 and "deepspeed.precision: fp16 is not supported on this accelerator" in res.stdout



# ------------------------------------------------------------------------------------------- wall-clock budget
BUDGET_MIN = 0.4  # 24 s of training; the debug step is ~0.25 s on 2 idle cores (several times that when busy)
BUDGET = ["train.steps=100000", f"train.max_minutes={BUDGET_MIN}", "train.val_every=10", "checkpoint.every=5",
          "checkpoint.keep_last=20", "optim.min_lr_ratio=0.1", "optim.warmup_steps=2"]


def budget_checks(run_dir: Path) -> dict:
    """What every budgeted run must show: it stopped at its plan, within one step of the budget, LR at its floor."""
    summary = json.loads((run_dir / "summary.json").read_text())
    b = summary["budget"]
    ev = read_events(run_dir / "tb")
    assert b["max_minutes"] == BUDGET_MIN and b["planned_steps"] == b["reached_steps"] == summary["step"]
    # within one step of the budget: at most one step over (the final validation and checkpoint are reserved at
    # their measured cost, so their own timing noise adds to the slack); under noise it may stop a little early
    budget_s = BUDGET_MIN * 60
    longest = max(v for _, v in ev["perf/step_time_s"])
    slack = longest + b["measured_validation_s"] + b["measured_checkpoint_s"]
    assert b["elapsed_s"] <= budget_s + slack, (b, longest)
    assert b["elapsed_s"] >= 0.85 * budget_s, b
    # the schedule reached its end: the last update ran at the minimum LR (0.1 x 0.01)
    lr = dict(ev["train/lr"])
    assert lr[summary["step"]] == pytest.approx(0.001, rel=1e-4)
    assert lr[summary["step"] - 1] > lr[summary["step"]]
    assert summary["step"] > 12  # it did train a while (warm-up and measuring take the first 5 steps)
    return summary


def test_a_wall_clock_budget_plans_the_schedule_and_a_resumed_run_spends_only_what_is_left(runner, brats_store,
                                                                                         tmp_path):
    """A budgeted run plans its steps after timing 3 (rank 0 plans, the plan is broadcast), is SIGKILLed at step
    10, and the rerun goes on with the saved plan and stops at it with a final checkpoint on every rank, the two
    runs together within the budget."""
    from distseg.train.optim import lr_lambda

    run_dir = tmp_path / "runs" / "resumed"
    ckpt = run_dir / "checkpoints"
    proc = runner.start(runner.launcher_cmd(DEBUG, common(brats_store, tmp_path, "resumed", *BUDGET)),
                        tmp_path / "killed.log")
    runner.wait_for(ckpt / "step_00000010" / "COMPLETE.json", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = (tmp_path / "killed.log").read_text()
    assert "wall-clock budget:" in killed and "steps planned at step 5" in killed  # 2 warm-up + 3 timed steps
    kept = json.loads((ckpt / "step_00000010" / "trainer_state.json").read_text())["counters"]
    assert kept["planned_steps"] and kept["planned_steps"] > 10 and kept["elapsed_s"] > 0
    shutil.rmtree(run_dir / "tb")  # keep only the rerun's events (the killed run logged steps past 10 too)

    out = runner.ok(runner.run(runner.launcher_cmd(DEBUG, common(brats_store, tmp_path, "resumed", *BUDGET))))
    assert "resumed from checkpoint step_00000010 (step 10," in out
    summary = budget_checks(run_dir)  # the total over both runs stays within the budget
    assert summary["resumed_from"] == "step_00000010"
    # the schedule continued unchanged: until the rerun has timed its own steps (2 warm-up + 3), its updates use
    # the LR of the plan saved in the checkpoint
    cfg = load_config(run_dir / "config.yaml")
    factor = lr_lambda(cfg.optim, kept["planned_steps"])
    lr = dict(read_events(run_dir / "tb")["train/lr"])
    assert [lr[s] for s in range(11, 16)] == pytest.approx([0.01 * factor(s - 1) for s in range(11, 16)], rel=1e-5)
    # it stopped at the plan with a final checkpoint that every rank saved
    assert (ckpt / "latest").read_text() == f"step_{summary['step']:08d}"
    state = json.loads((ckpt / f"step_{summary['step']:08d}" / "trainer_state.json").read_text())
    assert state["counters"]["planned_steps"] == summary["step"]
    assert state["counters"]["elapsed_s"] <= summary["elapsed_s"]
    assert markers(ckpt)[f"step_{summary['step']:08d}"]["files"].keys() >= {"rng_rank00000.pt", "rng_rank00001.pt"}
