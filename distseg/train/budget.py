"""A wall-clock budget for training (`train.max_minutes`): how many optimizer steps fit, and when to stop.

    budget = WallClockBudget(cfg.train, cfg.checkpoint, elapsed_s=state.elapsed_s)
    ... after every optimizer step:   budget.step_done(seconds)      (training step time, validation excluded)
    ... after a validation / save:     budget.validation_done(seconds) / budget.checkpoint_done(seconds)
    planned = budget.plan(step, elapsed_s)   -> total optimizer steps (rank 0 decides; the trainer broadcasts)

What counts: `elapsed_s` is training time, summed over every run of the job (resumed runs add to it): the loop's
steps, validations and checkpoint saves. Launcher start-up, DeepSpeed initialisation and loading a checkpoint are
not counted (they do not depend on the plan). Time spent after the last COMPLETE checkpoint of a killed run is
not counted either: the rerun repeats those steps, so the budget pays for the progress that was kept.

How the plan is made: the first `budget_warmup_steps` steps of each run are not timed (allocator, worker start-up,
kernel selection); after `budget_measure_steps` timed steps the recent mean step time, the measured cost of one
validation and of one checkpoint (each amortised at its cadence, plus the final validation and checkpoint) give the
largest step count that fits in the budget, capped by `train.steps`. The plan is revised at every re-plan point
(the trainer's log steps), so a machine that slows down or speeds up moves the end, and the LR schedule with it,
with two rules that keep the schedule's end reached:

* the plan is always at least one step ahead (`step + 1`), so the last update is known to be the last when its LR
  is set and runs at the schedule's final LR; the price is at most one step past the budget;
* in the tail (the last `TAIL_FRACTION` of the plan, at least 2 steps) the end moves in only when keeping it would
  overrun the budget by more than one step, and out only when two more steps fit: timing noise of a step or so
  no longer moves the LR near its floor.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

logger = logging.getLogger(__name__)

RECENT_STEPS = 50
"""Step time = mean of the last this many timed steps: follows a machine whose speed changes (shared nodes)."""
TAIL_FRACTION = 0.1
"""The last fraction of the planned steps in which the planned end only moves to avoid overrunning the budget."""


@dataclass
class CostEstimate:
    """Measured seconds of the things a run repeats (means over what this run and its predecessors timed)."""

    step_s: float | None = None
    """Seconds of one optimizer step (data wait + forward/backward + optimizer): mean of the recent timed steps,
    warm-up steps excluded."""
    validation_s: float | None = None
    """Mean seconds of one validation (None: not timed yet)."""
    validation_count: int = 0
    checkpoint_s: float | None = None
    """Mean seconds of one checkpoint save (None: not timed yet)."""
    checkpoint_count: int = 0


def _mean_in(mean: float | None, count: int, value: float) -> tuple[float, int]:
    if mean is None or count == 0:
        return value, 1
    return mean + (value - mean) / (count + 1), count + 1


def _events_in(first: int, last: int, every: int) -> int:
    """Multiples of `every` in (first, last]; 0 when `every` is 0 (never)."""
    if every <= 0 or last <= first:
        return 0
    return last // every - first // every


class WallClockBudget:
    """Plans the optimizer steps that fit in `max_minutes` of training time (see the module docstring).

    Pure bookkeeping: it never talks to other ranks. The trainer calls `plan` on rank 0 and broadcasts the result,
    so every rank stops at the same step.
    """

    def __init__(
        self,
        max_minutes: float,
        max_steps: int,
        val_every: int,
        checkpoint_every: int,
        warmup_steps: int,
        measure_steps: int,
        costs: CostEstimate | None = None,
    ) -> None:
        self.budget_s = float(max_minutes) * 60.0
        self.max_steps = int(max_steps)
        self.val_every = int(val_every)
        self.checkpoint_every = int(checkpoint_every)
        self.warmup_steps = int(warmup_steps)
        self.measure_steps = int(measure_steps)
        self.costs = costs or CostEstimate()
        self._steps_this_run = 0
        self._recent: deque[float] = deque(maxlen=RECENT_STEPS)

    # ------------------------------------------------------------------------------------------- measurements
    def step_done(self, seconds: float) -> None:
        """One optimizer step of this run took `seconds` (validation and checkpoint excluded)."""
        self._steps_this_run += 1
        if self._steps_this_run <= self.warmup_steps:
            return
        self._recent.append(seconds)
        if self.ready:
            self.costs.step_s = sum(self._recent) / len(self._recent)

    def validation_done(self, seconds: float) -> None:
        c = self.costs
        c.validation_s, c.validation_count = _mean_in(c.validation_s, c.validation_count, seconds)

    def checkpoint_done(self, seconds: float) -> None:
        c = self.costs
        c.checkpoint_s, c.checkpoint_count = _mean_in(c.checkpoint_s, c.checkpoint_count, seconds)

    @property
    def ready(self) -> bool:
        """Enough steps of THIS run timed to plan (a resumed run re-measures: it may run on another machine)."""
        return len(self._recent) >= self.measure_steps

    # ------------------------------------------------------------------------------------------- the plan
    def seconds_for(self, step: int, planned: int) -> float:
        """Predicted training seconds to go from `step` to `planned` steps, the final validation and checkpoint
        included (unmeasured costs count as 0 until measured)."""
        c = self.costs
        step_s = c.step_s or 0.0
        val_s, ckpt_s = c.validation_s or 0.0, c.checkpoint_s or 0.0
        n_val = _events_in(step, planned, self.val_every)
        n_ckpt = _events_in(step, planned, self.checkpoint_every)
        # The last step always validates (when validation is on) and always saves.
        if self.val_every and planned % self.val_every:
            n_val += 1
        if not self.checkpoint_every or planned % self.checkpoint_every:
            n_ckpt += 1
        return (planned - step) * step_s + n_val * val_s + n_ckpt * ckpt_s

    def largest_fit(self, step: int, elapsed_s: float) -> int:
        """The largest total step count whose predicted time fits in what is left of the budget (>= `step`, <=
        `train.steps`)."""
        left = self.budget_s - elapsed_s
        if self.costs.step_s is None or self.costs.step_s <= 0:
            return self.max_steps
        # seconds_for(step, n) never decreases as n grows: bisect for the largest n that fits.
        lo, hi = step, self.max_steps  # invariant: lo fits (or lo == step: nothing fits), hi + 1 does not
        if hi > lo and self.seconds_for(step, hi) <= left:
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.seconds_for(step, mid) <= left:
                lo = mid
            else:
                hi = mid
        return lo

    def plan(self, step: int, elapsed_s: float, current: int | None = None) -> int:
        """The total optimizer steps to run, `step` of them done, given the current plan (None before the first):
        the largest count that fits, at least one step ahead, and frozen in the tail (module docstring)."""
        if step >= self.max_steps:
            return self.max_steps
        if current is not None and current <= step:
            return current  # the planned end is reached: the run stops here, the plan never grows past it
        fit = max(self.largest_fit(step, elapsed_s), step + 1)
        if current is None:
            return fit
        if current - step <= max(2, TAIL_FRACTION * current):
            overrun = self.seconds_for(step, current) - (self.budget_s - elapsed_s)
            if overrun > (self.costs.step_s or 0.0):
                return min(current, fit)
            return fit if fit >= current + 2 else current  # moves out only when two more steps fit
        return fit

    def summary(self) -> dict[str, float | int | None]:
        c = self.costs
        return {
            "step_s": c.step_s,
            "validation_s": c.validation_s,
            "checkpoint_s": c.checkpoint_s,
        }


def describe(planned: int, step: int, budget: WallClockBudget, elapsed_s: float) -> str:
    """One log line about a (re)plan."""
    c = budget.costs
    left = budget.budget_s - elapsed_s

    def fmt(v: float | None) -> str:
        return "n/a" if v is None or not math.isfinite(v) else f"{v:.2f}s"

    return (f"wall-clock budget: {planned} steps planned at step {step} ({left:.0f}s of "
            f"{budget.budget_s:.0f}s left; step {fmt(c.step_s)}, validation {fmt(c.validation_s)}, "
            f"checkpoint {fmt(c.checkpoint_s)})")
