"""The trainer's wall-clock budget steps (a mixin of `distseg.train.trainer.Trainer`): training time so far, timing
of validations and saves, and the (re)plan of the steps that fit in `train.max_minutes` (`distseg.train.budget`).

Reads the trainer's attributes: cfg, state, budget, engine, rank, schedule_length, validate, _save, and the loop's
`_elapsed_base`, `_t_start`, `_event_s`.
"""

from __future__ import annotations

import logging
import time

from distseg.core import dist
from distseg.train.budget import describe
from distseg.train.optim import refresh_lr

logger = logging.getLogger("distseg.train.trainer")  # the trainer's messages, wherever its methods live


class BudgetSteps:
    """Time and (re)plan (see the module doc)."""

    def _elapsed(self) -> float:
        """Training seconds of this job: the previous runs' (from the checkpoint) plus this run's loop so far."""
        return self._elapsed_base + (time.perf_counter() - self._t_start)

    def _timed(self, fn, what: str) -> None:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        self._event_s += seconds
        if self.budget is not None:
            getattr(self.budget, f"{what}_done")(seconds)

    def _plan(self) -> None:
        """(Re)plan the steps that fit in `train.max_minutes` (collective: rank 0 decides, everyone follows).

        The first plan of a fresh run times one checkpoint save first (the final save must fit too) and, when
        no periodic validation would come before the planned end, one validation as well."""
        assert self.budget is not None
        cfg, state, budget = self.cfg, self.state, self.budget
        first = state.planned_steps is None
        if first and budget.costs.checkpoint_s is None:
            self._timed(self._save, "checkpoint")
        planned = self._broadcast_plan()
        if (first and cfg.train.val_every and budget.costs.validation_s is None
                and (state.step // cfg.train.val_every + 1) * cfg.train.val_every >= planned):
            self._timed(self.validate, "validation")
            planned = self._broadcast_plan()
        if planned != self.schedule_length.total or first:
            changed = first or abs(planned - self.schedule_length.total) * 20 >= max(1, planned)
            self.schedule_length.total = planned
            refresh_lr(self.engine.lr_scheduler)  # the next update already follows the new plan
            if changed and self.rank == 0:  # log the first plan and moves of >= 5 %, not every small revision
                logger.info("%s", describe(planned, state.step, budget, self._elapsed()))
        state.planned_steps = planned

    def _broadcast_plan(self) -> int:
        planned = None
        if self.rank == 0:
            planned = self.budget.plan(self.state.step, self._elapsed(), self.state.planned_steps)
        return int(dist.broadcast_object(planned))
