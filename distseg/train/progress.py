"""What the trainer reports: host-side timing windows between log steps, the scalars of a log step, and the run
summary (`<run>/summary.json`)."""

from __future__ import annotations

import math
from typing import Any

from distseg.train.budget import WallClockBudget
from distseg.train.state import TrainState


class StepWindow:
    """Host-side sums over the micro-batches since the last log line (the loss is summed on the device)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.time = 0.0
        self.data_time = 0.0
        self.flag_time = 0.0
        self.count = 0

    def add(self, seconds: float, data_seconds: float) -> None:
        self.time += seconds
        self.data_time += data_seconds
        self.count += 1


def perf_scalars(window: StepWindow, samples_per_micro_batch: int, voxels: int, grad_accum: int) -> dict[str, float]:
    """Throughput and timing of the steps in `window`: `samples_per_micro_batch` is the batch size times the ranks,
    `voxels` the voxels of one sample."""
    samples = window.count * samples_per_micro_batch
    return {
        "perf/samples_per_s": samples / window.time,
        "perf/voxels_per_s": samples * voxels / window.time,
        "perf/data_wait_fraction": window.data_time / window.time,
        "perf/step_time_s": window.time * grad_accum / max(1, window.count),
        # the stop-flag all-reduce, per optimizer step (its cost: see .notes/fault.md)
        "perf/stop_flag_ms": 1e3 * window.flag_time / max(1, window.count / grad_accum),
    }


def run_summary(state: TrainState, last_dice: dict[str, float], seconds_per_step: float | None,
                resumed_from: str | None, world_size: int, stopped: bool,
                budget: WallClockBudget | None, max_minutes: float | None, max_steps: int) -> dict[str, Any]:
    """The content of ``<run>/summary.json``: where the run ended, for people and scripts (the demo prints it)."""
    summary: dict[str, Any] = {
        "step": state.step,
        "val_dice": last_dice,
        "val_dice_mean": state.val_dice,
        "val_step": state.val_step,
        "samples_seen": state.samples_seen,
        "nonfinite_skipped": state.nonfinite_skipped,
        "seconds_per_step": seconds_per_step,
        "elapsed_s": state.elapsed_s,
        "resumed_from": resumed_from,
        "world_size": world_size,
        "stopped_on_signal": stopped,
    }
    if budget is not None:
        summary["budget"] = {
            "max_minutes": max_minutes,
            "planned_steps": state.planned_steps,
            "reached_steps": state.step,
            "elapsed_s": state.elapsed_s,
            "max_steps": max_steps,
            **{f"measured_{k}": v for k, v in budget.summary().items()},
        }
    return summary


def mean_loss(loss_sum: float, count: float) -> float:
    return loss_sum / count if count else math.nan
