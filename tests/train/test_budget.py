"""The wall-clock planner (`distseg.train.budget`) on made-up timings; the trainer's use of it runs through the real
launcher in tests/train/test_launch.py."""

from __future__ import annotations

import pytest

from distseg.train.budget import CostEstimate, WallClockBudget


def budget(minutes: float = 1.0, steps: int = 10_000, val_every: int = 10, ckpt_every: int = 20,
           costs: CostEstimate | None = None) -> WallClockBudget:
    return WallClockBudget(minutes, steps, val_every, ckpt_every, warmup_steps=2, measure_steps=3, costs=costs)


def test_warm_up_steps_are_not_timed_and_planning_waits_for_measurements():
    b = budget()
    for seconds in (9.0, 9.0):  # start-up steps: slow, excluded
        b.step_done(seconds)
    assert b.costs.step_s is None and not b.ready
    assert b.plan(2, 10.0) == 10_000  # nothing measured: the schedule keeps spanning train.steps
    for _ in range(3):
        b.step_done(0.5)
    assert b.ready and b.costs.step_s == pytest.approx(0.5)


def test_the_plan_fits_steps_validations_checkpoints_and_the_final_ones_into_the_budget():
    b = budget(minutes=1.0, costs=CostEstimate(step_s=0.5, validation_s=2.0, checkpoint_s=1.0))
    planned = b.plan(0, 0.0)
    # n steps + validations every 10 + checkpoints every 20 + a final validation/checkpoint when off-cadence
    assert b.seconds_for(0, planned) <= 60.0 < b.seconds_for(0, planned + 1)
    assert planned == 80  # 40 s of steps + 8 validations (16 s) + 4 checkpoints (4 s) = 60 s
    assert b.seconds_for(0, 80) == pytest.approx(60.0)
    assert b.seconds_for(0, 81) == pytest.approx(60.5 + 2.0 + 1.0)  # off-cadence end: final val + ckpt
    # what was already spent counts; train.steps caps the plan
    assert b.plan(10, 30.0) < planned
    assert budget(steps=50, costs=CostEstimate(step_s=0.5, validation_s=2.0, checkpoint_s=1.0)).plan(0, 0.0) == 50


def test_replans_stay_one_step_ahead_and_the_tail_moves_only_beyond_noise():
    b = budget(minutes=1.0, val_every=0, ckpt_every=0, costs=CostEstimate(step_s=1.0, checkpoint_s=0.0))
    assert b.plan(0, 0.0) == 60
    assert b.plan(30, 40.0, current=60) == 50  # slower than planned: the end moves in
    assert b.plan(30, 20.0, current=50) == 70  # faster: it moves out again
    # tail (last 10 %): small timing noise keeps the end ...
    assert b.plan(56, 56.5, current=60) == 60  # overrun 0.5 s <= one step: keep
    assert b.plan(56, 54.5, current=60) == 60  # room for one more step only: keep
    assert b.plan(56, 50.0, current=60) == 66  # room for 6 more: move out
    # ... an overrun beyond one step moves it in, but never below the next step: its LR is already set
    assert b.plan(56, 58.5, current=60) == 57
    assert b.plan(40, 70.0, current=60) == 41  # budget already spent: exactly one more step
    # a reached end stays the end (the trainer stops there)
    assert b.plan(60, 59.0, current=60) == 60


def test_a_resumed_run_keeps_its_costs_but_measures_its_own_step_time():
    saved = CostEstimate(step_s=2.0, validation_s=3.0, validation_count=2, checkpoint_s=1.0, checkpoint_count=1)
    b = budget(costs=saved)
    assert not b.ready  # re-measures: the rerun may be on another machine
    for seconds in (5.0, 5.0, 1.0, 1.0, 1.0):
        b.step_done(seconds)
    assert b.costs.step_s == pytest.approx(1.0) and b.costs.validation_s == 3.0
    b.validation_done(6.0)
    assert b.costs.validation_s == pytest.approx(4.0)  # running mean over every validation timed
