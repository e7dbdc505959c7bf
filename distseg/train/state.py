"""The trainer's counters (saved in every checkpoint) and its errors."""

from __future__ import annotations

from dataclasses import dataclass


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps were skipped as non-finite; the run stops (last good checkpoint kept)."""


@dataclass
class TrainState:
    """The trainer's counters; saved in every checkpoint (trainer_state.json)."""

    step: int = 0
    """Optimizer steps done."""
    micro_batches: int = 0
    """Micro-batches drawn from the loader on each rank since `stream_base` (= the loader position to resume from)."""
    stream_base: int = 0
    """Global micro-batches drawn before this rank count took over (changes only on an elastic resume)."""
    samples_seen: int = 0
    """Samples (all ranks) that went into an optimizer update."""
    nonfinite_skipped: int = 0
    """Optimizer steps (or, on engines without a gradient check, micro-batches) skipped as non-finite."""
    val_dice: float | None = None
    """Mean validation Dice of the latest validation."""
    val_step: int | None = None
    """The step `val_dice` was measured at (a checkpoint is "best"-eligible only at that step)."""
    elapsed_s: float = 0.0
    """Training seconds so far, over every run of this job (see distseg.train.budget for what counts)."""
    planned_steps: int | None = None
    """Under `train.max_minutes`: the optimizer steps the LR schedule spans (None before the first plan)."""
