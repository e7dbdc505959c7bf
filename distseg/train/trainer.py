"""The training loop: one readable loop over micro-batches, run identically on every rank.

    trainer = Trainer(cfg)      # after dist.init_distributed(); resumes from the newest COMPLETE checkpoint
    trainer.train()
    trainer.close()

Step = one optimizer step = `train.grad_accum` micro-batches per rank. Everything random derives from
(seed, global sample position), so a run resumed from step N continues exactly like an uninterrupted one, and on
another rank count with the same samples per step (`distseg.train.elastic`). A stop signal ends the run after the
current step with a checkpoint (`distseg.train.preemption`); a lost rank ends it with a message
(`distseg.train.lost_rank`).
Collectives (all-reduces, forwards under ZeRO-3, checkpoint saves) happen on every rank in the same order.

Host-device syncs: the micro-step itself has none of ours (the loss for logging accumulates on the device and is
all-reduced at log steps). A non-finite loss or gradient on any rank skips the whole optimizer step: DeepSpeed's
ZeRO and bf16/fp16 optimizers check the global gradient norm in `engine.step()` (their one sync per step) and
discard the step's gradients on every rank. Engines without that check (ZeRO 0 in fp32) fall back to one all-reduced
flag per micro-batch between forward and backward (a host sync), skipping just that micro-batch.

`train.max_minutes` (distseg.train.budget): the run times its steps, plans the steps that fit, lays the LR schedule over
them, and stops there with a final checkpoint; rank 0 plans and broadcasts, so every rank stops at the same step.

The trainer's resume/save steps live in `distseg.train.checkpoint_steps` and its budget timing and re-planning in
`distseg.train.budget_steps` (mixins: same object, same attributes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from distseg.config import ExperimentConfig, make_run_dir, write_resolved
from distseg.core import checkpoint, dist
from distseg.data.loader import build_device_augment, build_train_loader, build_val_iterator, open_store
from distseg.data.targets import labels_to_targets, target_names
from distseg.inference.loading import ModelIO
from distseg.inference.postprocess import clip_to_containers
from distseg.losses import build_loss
from distseg.metrics import MetricAccumulator, confusion_counts_from_masks
from distseg.train import elastic, lost_rank
from distseg.train.budget import WallClockBudget
from distseg.train.budget_steps import BudgetSteps
from distseg.train.checkpoint_steps import CheckpointSteps
from distseg.train.engine import build_ds_config, initialize, resolve_precision
from distseg.train.mirror import build_mirror
from distseg.train.monitor import build_monitor, memory_stats
from distseg.train.optim import ScheduleLength
from distseg.train.preemption import StopRequest
from distseg.train.progress import StepWindow, mean_loss, perf_scalars, run_summary
from distseg.train.setup import DTYPES, build_seeded_model, model_channels
from distseg.train.speed import apply_backend_flags, compile_engine
from distseg.train.state import NonFiniteLossError, TrainState
from distseg.train.validation import WholeCaseValidator, crop_logits

logger = logging.getLogger(__name__)

CASES_FILE = "cases.json"
"""<run>/cases.json: the case ids a run trains on and validates on (written by rank 0 at start)."""

class Trainer(CheckpointSteps, BudgetSteps):
    """Builds the model, engine, loss, augmentation and monitor for this rank; `train()` runs the loop."""

    def __init__(self, cfg: ExperimentConfig, stop: StopRequest | None = None) -> None:
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.device = dist.device()
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.stop = stop if stop is not None else StopRequest()  # launch/train.py installs its signal handlers
        self.stopped = False
        """True when the run ended early on a stop signal (checkpoint saved): the caller exits EXIT_REQUEUE."""
        # An s3:// run: the bucket's newest complete checkpoint is brought into every node's staging folder first.
        self.mirror = build_mirror(self.run_dir, cfg.run_url, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best,
                                   cfg.checkpoint.upload_nice)
        self.mirror.download_newest()  # collective
        # Rank 0 picks the checkpoint (collective); on another rank count the accumulation changes to keep the
        # global batch, so the plan comes before anything that reads cfg.train.grad_accum.
        cfg = resolve_precision(cfg)  # "auto" -> what this accelerator runs natively (launch/train.py did too)
        self.plan = elastic.plan_resume(self.ckpt_dir, cfg, self.world_size)
        self.cfg = cfg = elastic.with_grad_accum(cfg, self.plan)
        store = open_store(cfg.data)
        self.regions = store.regions
        # What a predictor needs besides the weights; saved in every checkpoint (see distseg.inference.predictor).
        self.io = ModelIO.from_store(cfg, store)
        self.validator = None
        if cfg.train.val_every and cfg.train.val_mode == "whole":
            self.validator = WholeCaseValidator(cfg.data, store, self.rank, self.world_size, cfg.train.val_overlap,
                                                cfg.train.val_window_batch)
        self.channel_names = target_names(cfg.data.target, store.regions)
        train_ids = store.case_ids(exclude_folds=cfg.data.val_folds, labelled_only=True)
        self.train_cases = len(train_ids)
        if self.rank == 0:
            make_run_dir(cfg)
            if self.plan.tag is not None:
                warn_config_changes(self.run_dir, cfg)
            write_resolved(cfg, self.run_dir)
            # The audit trail of what this run saw: the cases it trains on and the ones that choose its "best"
            # checkpoint. Test-split cases are in neither (the store never lists them for training or validation).
            val_ids = store.case_ids(folds=cfg.data.val_folds, labelled_only=True) if cfg.data.val_folds else []
            trained = set(train_ids)
            if self.plan.tag is not None:  # resuming: the model also learnt from what earlier starts trained on
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    trained |= set(json.loads((self.run_dir / CASES_FILE).read_text(encoding="utf-8"))["train"])
            checkpoint.write_json(self.run_dir / CASES_FILE, {
                "store": str(store.path), "val_folds": list(cfg.data.val_folds), "train": sorted(trained),
                "validation": val_ids, "test_split_excluded": len(store.case_ids(split="test"))})
        if self.plan.universal:
            elastic.ensure_universal(self.ckpt_dir / str(self.plan.tag))  # collective: rank 0 converts
        apply_backend_flags(cfg.train.cudnn_benchmark, self.device.type)
        model = build_seeded_model(cfg, *model_channels(cfg, store))
        self.schedule_length = ScheduleLength(cfg.train.steps)
        ds_config = {**build_ds_config(cfg, self.world_size), **elastic.universal_ds_config(self.plan)}
        self.engine = initialize(model, cfg, ds_config, self.schedule_length)
        compile_engine(self.engine, cfg.model.compile)
        # DeepSpeed's ZeRO and bf16/fp16 optimizers expose `overflow` and skip steps whose global gradient norm
        # is not finite; a plain (ZeRO 0 fp32) optimizer would apply it, so there we check each micro-batch.
        self.skip_check = "step" if hasattr(self.engine.optimizer, "overflow") else "micro_batch"
        self.control = dist.control_group(cfg.dist.timeout_s)  # collective; the stop flag's gloo group
        self.dtype = DTYPES[cfg.deepspeed.precision]
        self.loss_fn = build_loss(cfg.loss)
        self.augment = build_device_augment(cfg.data, cfg.run.seed)
        self.monitor = build_monitor(cfg.monitor, self.run_dir, self.rank)
        self.state = TrainState()
        self.resumed_from: str | None = None
        self.last_dice: dict[str, float] = {}
        self._last_image_step = -(10**9)
        self.budget: WallClockBudget | None = None
        budget_costs = self._resume()
        if cfg.train.max_minutes is not None:
            t = cfg.train
            self.budget = WallClockBudget(t.max_minutes, t.steps, t.val_every, cfg.checkpoint.every,
                                          t.budget_warmup_steps, t.budget_measure_steps, budget_costs)

    def _inject_nan(self) -> bool:
        """FAULT INJECTION (debug.inject_nan_at_step): rank 0's loss becomes NaN for `inject_nan_times` tries."""
        d = self.cfg.debug
        return self.rank == 0 and self.state.step == d.inject_nan_at_step and self._injected < d.inject_nan_times

    def _micro_step(self, batch: dict[str, Any]) -> bool:
        """Forward/backward one micro-batch; False when it was skipped (micro-batch check only, see module doc).

        No host sync on the "step" path: the batch arrives pinned (non-blocking copy), augmentation parameters
        travel in one pinned non-blocking copy, the region table is cached per device, and the loss is summed on
        the device for the next log step.
        """
        image = batch["image"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        image, label = self.augment(image, label, batch["sample_index"])  # (B, C, *P), (B, *P) on the device
        targets = labels_to_targets(label, self.cfg.data.target, self.regions)  # (B, K, *P) float32
        logits = self.engine(image.to(self.dtype))  # DeepSpeed holds the weights in bf16/fp16/fp32
        loss = self.loss_fn(logits, targets)  # fp32 scalar
        if self._inject_nan():
            self._injected += 1
            loss = loss * float("nan")
        finite = torch.isfinite(loss)
        self._loss_sum += torch.where(finite, loss.detach().float(), 0.0)
        self._loss_count += finite
        self._step_finite &= finite  # read only when DeepSpeed skips the step
        # Every rank must skip together, or the gradient all-reduce would mix skipped and applied micro-batches:
        # agree on one flag. Host sync: waits for the forward. Skip backward AND engine.step(): the micro-step
        # counter does not move, so the accumulation boundary stays where it was on every rank; the next finite
        # micro-batch takes this one's place.
        if self.skip_check == "micro_batch" and dist.all_reduce_sum((~finite).float()).item() > 0:
            return False
        self.engine.backward(loss)
        self.engine.step()  # at the accumulation boundary: an optimizer step, unless the gradients are non-finite
        return True

    # ------------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Dice per region from tp/fp/fn summed over this rank's shard, then all-reduced (never averaged ratios)."""
        self.engine.eval()
        acc = MetricAccumulator(self.channel_names)
        if self.validator is not None:  # whole cases, sliding window (distseg.train.validation)
            counts, example = self.validator.run(self.engine, self.device, self.dtype, self.cfg.data.target,
                                                 self.regions)
            if counts is not None:
                acc.update(counts)
        else:
            example = self._validate_crops(acc)
        metrics = acc.compute(device=self.device)  # the one all-reduce of the (K, 4) counts
        self.engine.train()
        dice = {f"val/{k}": v for k, v in metrics.items() if k.startswith("dice/")}
        self.state.val_dice, self.state.val_step = dice["val/dice/mean"], self.state.step
        self.last_dice = {k[len("val/dice/"):]: v for k, v in dice.items() if k != "val/dice/mean"}
        self.monitor.scalars(dice, self.state.step)
        # Images are big: one overlay per `monitor.image_every` steps (checked at validations), and at the end.
        due = self.state.step - self._last_image_step >= self.cfg.monitor.image_every
        if example is not None and (due or self.state.step >= self.schedule_length.total):
            self.monitor.overlay("val/overlay", *example, self.state.step)
            self._last_image_step = self.state.step
        logger.info("step %d validation: %s", self.state.step,
                    ", ".join(f"{k[4:]}={v:.4f}" for k, v in dice.items()))
        return dice

    def _validate_crops(self, acc: MetricAccumulator) -> tuple | None:
        """`train.val_mode=crop`: one centred crop per case (or every slice) from the validation iterator."""
        example = None
        # Every rank gets the same number of batches (padded with valid=False), since ZeRO-3 forwards are collective.
        for batch in build_val_iterator(self.cfg.data, self.rank, self.world_size):
            image = batch["image"].to(self.device)
            targets = labels_to_targets(batch["label"].to(self.device), self.cfg.data.target, self.regions)
            # data.downsample: pooled for the model, logits back on the crop's grid (distseg.train.validation)
            logits = crop_logits(self.engine, image, self.cfg.data.downsample, self.cfg.data.spatial_dims, self.dtype)
            valid = batch["valid"].to(self.device)
            masks = logits > 0  # decoded as prediction decodes them: nested regions clipped to their containers
            if self.cfg.data.target == "regions":
                clip_to_containers(masks.movedim(1, 0), self.regions)  # a view: (K, B, *P)
            # Boolean indexing sizes its output on the host: one sync per validation batch (validation only).
            acc.update(confusion_counts_from_masks(masks[valid], targets[valid] > 0.5))
            if example is None and bool(batch["valid"][0]):
                example = (image[0], targets[0], torch.sigmoid(logits[0]))
        return example

    # ------------------------------------------------------------------------------------------- the loop
    def train(self) -> TrainState:
        cfg, state = self.cfg, self.state
        self._injected = 0
        loader = build_train_loader(cfg.data, self.rank, self.world_size, cfg.run.seed, start_step=state.micro_batches,
                                    stream_base=state.stream_base)
        batches = iter(loader)
        voxels = math.prod(cfg.data.patch_size)
        window = StepWindow()
        # The loss of every micro-batch since the last log step, summed on the device (no per-step sync).
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_count = torch.zeros((), device=self.device)
        self._step_finite = torch.ones((), dtype=torch.bool, device=self.device)  # every loss of this step finite
        bar = tqdm(total=self.schedule_length.total, initial=state.step, disable=self.rank != 0, desc="train",
                   unit="step", dynamic_ncols=True)
        self.engine.train()
        start_step = state.step
        self._elapsed_base, self._t_start = state.elapsed_s, time.perf_counter()
        self._saved = state.step if self.resumed_from else -1  # the step of the newest checkpoint of this job
        logger.info("non-finite check: %s", "per optimizer step (DeepSpeed's gradient-norm check)"
                    if self.skip_check == "step" else "per micro-batch (all-reduced flag, one host sync each)")
        try:
            self._loop(batches, window, voxels, bar)
        except Exception as e:
            if not lost_rank.is_collective_failure(e):
                raise
            newest = checkpoint.newest_complete(self.ckpt_dir)
            hint = ("rerun the same command to resume from " +
                    (str(self.ckpt_dir / newest[0]) if newest else "the start (no complete checkpoint yet)"))
            raise lost_rank.report(e, self.rank, self.world_size, state.step, cfg.dist.timeout_s, hint) from e
        finally:
            batches.close()  # shuts the loader's (persistent) workers down now, not at interpreter exit
        bar.close()
        self.monitor.flush()
        state.elapsed_s = self._elapsed()
        seconds = time.perf_counter() - self._t_start
        steps_run = state.step - start_step  # 0 when a finished run is rerun: no timing to report
        if self.rank == 0:
            summary = run_summary(state, self.last_dice, seconds / steps_run if steps_run else None,
                                  self.resumed_from, self.world_size, self.stopped, self.budget,
                                  cfg.train.max_minutes, cfg.train.steps)
            checkpoint.write_json(self.run_dir / "summary.json", summary)
        return state

    def _loop(self, batches: Generator[dict[str, Any], None, None], window: StepWindow, voxels: int, bar: tqdm) -> None:
        """Micro-batches until the planned optimizer steps are done: step, log, (re)plan, validate, checkpoint."""
        cfg, state = self.cfg, self.state
        skipped_in_row = 0
        t_step, self._event_s = time.perf_counter(), 0.0
        while state.step < self.schedule_length.total:
            t0 = time.perf_counter()
            batch = next(batches)  # blocks while the loader workers are behind: data-wait time
            t_data = time.perf_counter() - t0
            state.micro_batches += 1
            boundary = self.engine.is_gradient_accumulation_boundary()
            lr = self.engine.get_lr()[0]  # the LR this step's update uses (a host value: no sync)
            applied = self._micro_step(batch)
            window.add(time.perf_counter() - t0, t_data)
            if applied and not boundary:
                continue
            if applied and not self.engine.was_step_applied() and self._loss_scale_overflow():
                logger.info("step %d: fp16 gradient overflow; step skipped and loss scale lowered", state.step)
                continue
            self._step_finite.fill_(True)
            if not applied or not self.engine.was_step_applied():
                state.nonfinite_skipped += 1
                skipped_in_row += 1
                what = "micro-batch" if not applied else "optimizer step"
                logger.warning("step %d: non-finite loss or gradients on some rank; %s skipped (%d in a row)",
                               state.step, what, skipped_in_row)
                if skipped_in_row >= cfg.train.max_nonfinite_in_row:
                    latest = checkpoint.newest_complete(self.ckpt_dir)
                    raise NonFiniteLossError(
                        f"{skipped_in_row} consecutive {what}s were skipped as non-finite at step {state.step} "
                        f"(train.max_nonfinite_in_row={cfg.train.max_nonfinite_in_row}); stopping. Last complete "
                        f"checkpoint: {self.ckpt_dir / latest[0] if latest else 'none'}. Try a lower optim.lr, "
                        "deepspeed.precision=fp32 or bf16, or check the data."
                    )
                continue
            skipped_in_row = 0
            state.samples_seen += cfg.data.batch_size * self.world_size * cfg.train.grad_accum
            state.step += 1
            bar.update(1)
            now = time.perf_counter()
            if self.budget is not None:
                # From the end of the previous step: its logging and re-planning count as step time (they recur
                # every log step), its validation and checkpoint do not (they are budgeted at their own cadence).
                self.budget.step_done(now - t_step - self._event_s)
            self._event_s, t_step = 0.0, now
            stop = self.stop.agree(self.control)  # one all-reduce of a flag per step: every rank stops together
            window.flag_time += time.perf_counter() - now
            self._after_step(window, voxels, bar, lr, stop)
            if stop and state.step < self.schedule_length.total:
                self.stopped = True
                logger.warning("stopped after step %d on request; checkpoint saved, rerun to resume", state.step)
                return

    def _loss_scale_overflow(self) -> bool:
        """After DeepSpeed skipped a step: True when that is fp16 loss scaling at work (every rank's losses were
        finite, only the scaled gradients overflowed), which is routine and not counted as non-finite. Collective;
        runs only on the (rare) skip path, so its host sync costs nothing per step."""
        all_finite = dist.all_reduce_sum((~self._step_finite).float()).item() == 0
        self._step_finite.fill_(True)
        return all_finite and self.cfg.deepspeed.precision == "fp16"

    def _after_step(self, window: StepWindow, voxels: int, bar: tqdm, lr: float, stop: bool) -> None:
        """Log, (re)plan the budget, validate and checkpoint as due after optimizer step `state.step`. On a stop
        request only the checkpoint is made (the grace period is for it), no validation or re-plan."""
        cfg, state = self.cfg, self.state
        log_due = state.step % cfg.monitor.log_every == 0
        if self.budget is not None and self.budget.ready and not stop and (log_due or state.planned_steps is None):
            self._plan()
        last = state.step >= self.schedule_length.total
        if log_due or last:
            self._log(window, voxels, bar, lr)
        # (A first budget plan may already have validated / saved at this step.)
        if (cfg.train.val_every and not stop and (state.step % cfg.train.val_every == 0 or last)
                and state.val_step != state.step):
            self._timed(self.validate, "validation")
        due = (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) or last or stop
        if due and self._saved != state.step:
            self._timed(self._save, "checkpoint")

    def _log(self, window: StepWindow, voxels: int, bar: tqdm, lr: float) -> None:
        """Scalars of the steps since the last log (collective: the loss is all-reduced here; rank 0 writes, other
        ranks hold a NullMonitor)."""
        packed = dist.all_reduce_sum(torch.stack([self._loss_sum, self._loss_count.float()]))
        loss_sum, count = packed.tolist()  # host sync, once per log step
        self._loss_sum.zero_()
        self._loss_count.zero_()
        values = {
            "train/loss": mean_loss(loss_sum, count),
            "train/lr": float(lr),
            "train/epoch": self.epoch,
            "train/nonfinite_skipped": float(self.state.nonfinite_skipped),
            **perf_scalars(window, self.cfg.data.batch_size * self.world_size, voxels, self.cfg.train.grad_accum),
            **memory_stats(self.device),
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        if self.budget is not None:
            values["budget/elapsed_min"] = self._elapsed() / 60.0
            values["budget/planned_steps"] = float(self.schedule_length.total)
        self.monitor.scalars(values, self.state.step)
        bar.total = self.schedule_length.total
        bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values['train/lr']:.2e}")
        window.reset()

    def close(self) -> None:
        self.monitor.close()
        self.mirror.close()  # waits for a pending upload: a stopped run (exit 4) leaves its checkpoint in the bucket


def warn_config_changes(run_dir: Path, cfg: ExperimentConfig) -> list[str]:
    """A resumed run whose config differs from the one it was started with (its config.yaml) says which keys
    changed: a longer schedule is the usual reason, another learning rate or model is rarely meant."""
    import yaml

    from distseg.config import config_changes, dump_yaml

    try:
        old = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []
    changes = config_changes(old, yaml.safe_load(dump_yaml(cfg)) or {})
    if changes:
        logger.warning("resuming %s under a changed config (%d key(s)): %s%s", run_dir, len(changes),
                       "; ".join(changes[:8]), "; ..." if len(changes) > 8 else "")
    return changes
