"""The trainer's checkpoint steps (a mixin of `distseg.train.trainer.Trainer`): resuming from the checkpoint rank 0
chose, saving one with the trainer's counters, and the epoch those counters stand for.

Reads the trainer's attributes: cfg, plan, engine, ckpt_dir, world_size, state, budget, last_dice, io, mirror,
schedule_length, train_cases (and `_elapsed` from `distseg.train.budget_steps.BudgetSteps`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from distseg.config import to_dict
from distseg.core import checkpoint
from distseg.train import elastic
from distseg.train.budget import CostEstimate
from distseg.train.state import TrainState

logger = logging.getLogger("distseg.train.trainer")  # the trainer's messages, wherever its methods live


class CheckpointSteps:
    """Resume and save (see the module doc)."""

    def _resume(self) -> CostEstimate | None:
        """Load the checkpoint rank 0 chose (`distseg.train.elastic.plan_resume`), if any; returns the wall-clock
        budget's saved timings."""
        plan = self.plan
        if plan.tag is None or plan.saved is None:
            return None
        same_layout = plan.saved.world_size == self.world_size
        saved = checkpoint.load(self.engine, self.ckpt_dir, plan.tag, universal=elastic.UNIVERSAL if plan.universal
                                else None, restore_rng=same_layout)
        self.state = TrainState(**saved["counters"])
        if not same_layout:  # the stream continues after every micro-batch the old ranks drew (distseg.train.elastic)
            self.state.stream_base += self.state.micro_batches * plan.saved.world_size
            self.state.micro_batches = 0
        # The latest validation result travels with the checkpoint, so a rerun of a finished run still reports it.
        self.last_dice = dict(saved.get("val_dice_regions", {}))
        self.resumed_from = plan.tag
        if self.state.planned_steps is not None:
            # The optimizer's LR was saved under this plan; the remaining steps follow the same schedule.
            self.schedule_length.total = self.state.planned_steps
        logger.info("resumed from checkpoint %s (step %d, written by %d ranks%s)", plan.tag, self.state.step,
                    plan.saved.world_size, ", universal format" if plan.universal else "")
        return CostEstimate(**saved["budget"]) if saved.get("budget") else None

    def _save(self) -> None:
        self._saved = self.state.step
        self.state.elapsed_s = self._elapsed()
        # A Dice belongs to the step it was measured at: only then may this checkpoint become "best".
        validated = self.state.val_step == self.state.step
        state = {"counters": asdict(self.state), "val_dice": self.state.val_dice if validated else None,
                 "val_step": self.state.val_step if validated else None, "val_dice_regions": self.last_dice,
                 "config": to_dict(self.cfg), "epoch": self.epoch,
                 "budget": asdict(self.budget.costs) if self.budget else None, "io": self.io.to_dict()}
        c = self.cfg.checkpoint
        layout = {"grad_accum": self.cfg.train.grad_accum, "batch_size": self.cfg.data.batch_size,
                  "zero_stage": self.cfg.deepspeed.zero_stage}
        tag = checkpoint.save(self.engine, self.ckpt_dir, self.state.step, state, c.keep_last, c.keep_best, layout)
        self.mirror.after_save(tag)  # s3:// runs: uploaded in the background, marker last

    @property
    def epoch(self) -> float:
        """Passes over the training cases, counted in samples (each case is drawn once per epoch across ranks)."""
        return self.state.samples_seen / max(1, self.train_cases)

    # ------------------------------------------------------------------------------------------- one micro-batch
