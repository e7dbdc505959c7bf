"""The training loop: one readable loop over micro-batches, run identically on every rank.

    trainer = Trainer(cfg)      # after dist.init_distributed(); resumes from the newest COMPLETE checkpoint
    trainer.train()
    trainer.close()

Step = one optimizer step = `train.grad_accum` micro-batches per rank. Everything random derives from
(seed, global sample position), so a run resumed from step N continues exactly like an uninterrupted one, and on
another rank count with the same samples per step (`distseg.elastic`). A stop signal ends the run after the
current step with a checkpoint (`distseg.preemption`); a lost rank ends it with a message (`distseg.lost_rank`).
Collectives (all-reduces, forwards under ZeRO-3, checkpoint saves) happen on every rank in the same order.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm import tqdm

from distseg import checkpoint, dist, elastic, lost_rank
from distseg.config import ConfigError, ExperimentConfig, make_run_dir, to_dict, write_resolved
from distseg.data.loader import build_device_augment, build_train_loader, build_val_iterator, open_store
from distseg.data.store import Store
from distseg.data.targets import labels_to_targets, num_targets, target_names
from distseg.engine import build_ds_config, initialize
from distseg.losses import build_loss
from distseg.metrics import MetricAccumulator, confusion_counts
from distseg.models import build_model
from distseg.monitor import build_monitor, memory_stats
from distseg.preemption import StopRequest

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLossError(RuntimeError):
    """Too many consecutive micro-batches had a non-finite loss; the run stops (last good checkpoint kept)."""


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
    """Micro-batches skipped because some rank's loss was not finite."""
    val_dice: float | None = None
    """Mean validation Dice of the latest validation."""


def model_channels(cfg: ExperimentConfig, store: Store) -> tuple[int, int]:
    """(in, out) channels the store implies: its modalities in, one sigmoid channel per target out.

    Raises ConfigError when `model.overrides` pins other values.
    """
    implied = {"in_channels": len(store.channels), "out_channels": num_targets(cfg.data.target, store.regions)}
    for key, value in implied.items():
        if key in cfg.model.overrides and cfg.model.overrides[key] != value:
            raise ConfigError(
                f"model.overrides.{key}: {cfg.model.overrides[key]} but the store {cfg.data.store} with "
                f"data.target={cfg.data.target} implies {value}; drop the override"
            )
    return implied["in_channels"], implied["out_channels"]


def build_seeded_model(cfg: ExperimentConfig, in_channels: int, out_channels: int) -> torch.nn.Module:
    """The model with identical initial weights on every rank: the init RNG is seeded from run.seed only."""
    torch.manual_seed(cfg.run.seed)
    overrides = {**cfg.model.overrides, "in_channels": in_channels, "out_channels": out_channels}
    model = build_model(cfg.model.name, cfg.model.preset, **overrides)
    if cfg.model.init_weights:
        state = torch.load(cfg.model.init_weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        logger.info("initial weights from %s", cfg.model.init_weights)
    return model


class Trainer:
    """Builds the model, engine, loss, augmentation and monitor for this rank; `train()` runs the loop."""

    def __init__(self, cfg: ExperimentConfig, stop: StopRequest | None = None) -> None:
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.device = dist.device()
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.stop = stop if stop is not None else StopRequest()  # launch/train.py installs its signal handlers
        self.stopped = False
        """True when the run ended early on a stop signal (checkpoint saved): the caller exits EXIT_REQUEUE."""
        # Rank 0 picks the checkpoint (collective); on another rank count the accumulation changes to keep the
        # global batch, so the plan comes before anything that reads cfg.train.grad_accum.
        self.plan = elastic.plan_resume(self.ckpt_dir, cfg, self.world_size)
        self.cfg = cfg = elastic.with_grad_accum(cfg, self.plan)
        store = open_store(cfg.data)
        self.regions = store.regions
        self.channel_names = target_names(cfg.data.target, store.regions)
        self.train_cases = len(store.case_ids(exclude_folds=cfg.data.val_folds, labelled_only=True))
        if self.rank == 0:
            make_run_dir(cfg)
            write_resolved(cfg, self.run_dir)
        if self.plan.universal:
            elastic.ensure_universal(self.ckpt_dir / str(self.plan.tag))  # collective: rank 0 converts
        model = build_seeded_model(cfg, *model_channels(cfg, store))
        ds_config = {**build_ds_config(cfg, self.world_size), **elastic.universal_ds_config(self.plan)}
        self.engine = initialize(model, cfg, ds_config)
        self.control = dist.control_group(cfg.dist.timeout_s)  # collective; the stop flag's gloo group
        self.dtype = _DTYPES[cfg.deepspeed.precision]
        self.loss_fn = build_loss(cfg.loss)
        self.augment = build_device_augment(cfg.data, cfg.run.seed)
        self.monitor = build_monitor(cfg.monitor, self.run_dir, self.rank)
        self.state = TrainState()
        self.resumed_from: str | None = None
        self.last_dice: dict[str, float] = {}
        self._last_image_step = -(10**9)
        self._resume()

    # ------------------------------------------------------------------------------------------- resume
    def _resume(self) -> None:
        plan = self.plan
        if plan.tag is None or plan.saved is None:
            return
        same_layout = plan.saved.world_size == self.world_size
        saved = checkpoint.load(self.engine, self.ckpt_dir, plan.tag, universal=elastic.UNIVERSAL if plan.universal
                                else None, restore_rng=same_layout)
        self.state = TrainState(**saved["counters"])
        if not same_layout:  # the stream continues after every micro-batch the old ranks drew (distseg.elastic)
            self.state.stream_base += self.state.micro_batches * plan.saved.world_size
            self.state.micro_batches = 0
        # The latest validation result travels with the checkpoint, so a rerun of a finished run still reports it.
        self.last_dice = dict(saved.get("val_dice_regions", {}))
        self.resumed_from = plan.tag
        logger.info("resumed from checkpoint %s (step %d, written by %d ranks%s)", plan.tag, self.state.step,
                    plan.saved.world_size, ", universal format" if plan.universal else "")

    def _save(self) -> None:
        state = {"counters": asdict(self.state), "val_dice": self.state.val_dice, "val_dice_regions": self.last_dice,
                 "config": to_dict(self.cfg), "epoch": self.epoch}
        c = self.cfg.checkpoint
        layout = {"grad_accum": self.cfg.train.grad_accum, "batch_size": self.cfg.data.batch_size,
                  "zero_stage": self.cfg.deepspeed.zero_stage}
        checkpoint.save(self.engine, self.ckpt_dir, self.state.step, state, c.keep_last, c.keep_best, layout)

    @property
    def epoch(self) -> float:
        """Passes over the training cases, counted in samples (each case is drawn once per epoch across ranks)."""
        return self.state.samples_seen / max(1, self.train_cases)

    # ------------------------------------------------------------------------------------------- one micro-batch
    def _inject_nan(self) -> bool:
        """FAULT INJECTION (debug.inject_nan_at_step): rank 0's loss becomes NaN for `inject_nan_times` tries."""
        d = self.cfg.debug
        return self.rank == 0 and self.state.step == d.inject_nan_at_step and self._injected < d.inject_nan_times

    def _micro_step(self, batch: dict[str, Any]) -> tuple[float, bool]:
        """Forward/backward one micro-batch. Returns (mean loss over ranks, whether it was applied)."""
        image = batch["image"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        image, label = self.augment(image, label, batch["sample_index"])  # (B, C, *P), (B, *P) on the device
        targets = labels_to_targets(label, self.cfg.data.target, self.regions)  # (B, K, *P) float32
        logits = self.engine(image.to(self.dtype))  # DeepSpeed holds the weights in bf16/fp16/fp32
        loss = self.loss_fn(logits, targets)  # fp32 scalar
        if self._inject_nan():
            self._injected += 1
            loss = loss * float("nan")
        # Every rank must skip together, or the gradient all-reduce would mix skipped and applied micro-batches
        # and DeepSpeed's accumulation counters would drift apart: agree on one flag (and sum the loss for logging).
        finite = torch.isfinite(loss)
        packed = torch.stack([torch.where(finite, loss.detach(), torch.zeros_like(loss)), (~finite).float()])
        loss_sum, bad_ranks = dist.all_reduce_sum(packed.float()).tolist()  # host sync: waits for the forward
        if bad_ranks > 0:
            # Skip backward AND engine.step(): the micro-step counter does not move, so the accumulation
            # boundary stays where it was on every rank; the next finite micro-batch takes this one's place.
            return math.nan, False
        self.engine.backward(loss)
        self.engine.step()  # an optimizer step (+ LR schedule step) only at the accumulation boundary
        return loss_sum / self.world_size, True

    # ------------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Dice per region from tp/fp/fn summed over this rank's shard, then all-reduced (never averaged ratios)."""
        self.engine.eval()
        acc = MetricAccumulator(self.channel_names)
        example = None
        # Every rank gets the same number of batches (padded with valid=False), since ZeRO-3 forwards are collective.
        for batch in build_val_iterator(self.cfg.data, self.rank, self.world_size):
            image = batch["image"].to(self.device)
            targets = labels_to_targets(batch["label"].to(self.device), self.cfg.data.target, self.regions)
            logits = self.engine(image.to(self.dtype))
            logits = (logits[0] if isinstance(logits, list) else logits).float()
            valid = batch["valid"].to(self.device)
            # Boolean indexing sizes its output on the host: one sync per validation batch (validation only).
            acc.update(confusion_counts(logits[valid], targets[valid]))
            if example is None and bool(batch["valid"][0]):
                example = (image[0], targets[0], torch.sigmoid(logits[0]))
        metrics = acc.compute(device=self.device)  # the one all-reduce of the (K, 4) counts
        self.engine.train()
        dice = {f"val/{k}": v for k, v in metrics.items() if k.startswith("dice/")}
        self.state.val_dice = dice["val/dice/mean"]
        self.last_dice = {k[len("val/dice/"):]: v for k, v in dice.items() if k != "val/dice/mean"}
        self.monitor.scalars(dice, self.state.step)
        # Images are big: one overlay per `monitor.image_every` steps (checked at validations), and at the end.
        due = self.state.step - self._last_image_step >= self.cfg.monitor.image_every
        if example is not None and (due or self.state.step == self.cfg.train.steps):
            self.monitor.overlay("val/overlay", *example, self.state.step)
            self._last_image_step = self.state.step
        logger.info("step %d validation: %s", self.state.step,
                    ", ".join(f"{k[4:]}={v:.4f}" for k, v in dice.items()))
        return dice

    # ------------------------------------------------------------------------------------------- the loop
    def train(self) -> TrainState:
        cfg, state = self.cfg, self.state
        self._injected = 0
        loader = build_train_loader(cfg.data, self.rank, self.world_size, cfg.run.seed, start_step=state.micro_batches,
                                    stream_base=state.stream_base)
        batches = iter(loader)
        voxels = math.prod(cfg.data.patch_size)
        window = _Window()
        bar = tqdm(total=cfg.train.steps, initial=state.step, disable=self.rank != 0, desc="train", unit="step",
                   dynamic_ncols=True)
        self.engine.train()
        start_step, t_start = state.step, time.perf_counter()
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
        seconds = time.perf_counter() - t_start
        steps_run = state.step - start_step  # 0 when a finished run is rerun: no timing to report
        self._write_summary(seconds / steps_run if steps_run else None)
        return state

    def _loop(self, batches: Generator[dict[str, Any], None, None], window: _Window, voxels: int, bar: tqdm) -> None:
        """Micro-batches until `train.steps` optimizer steps are done: step, log, validate, checkpoint."""
        cfg, state = self.cfg, self.state
        nonfinite_in_row = 0
        while state.step < cfg.train.steps:
            t0 = time.perf_counter()
            batch = next(batches)  # blocks while the loader workers are behind: data-wait time
            t_data = time.perf_counter() - t0
            state.micro_batches += 1
            boundary = self.engine.is_gradient_accumulation_boundary()
            loss, applied = self._micro_step(batch)
            window.add(time.perf_counter() - t0, t_data, loss)
            if not applied:
                state.nonfinite_skipped += 1
                nonfinite_in_row += 1
                logger.warning("step %d: non-finite loss on some rank; micro-batch skipped (%d in a row)",
                               state.step, nonfinite_in_row)
                if nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
                    latest = checkpoint.newest_complete(self.ckpt_dir)
                    raise NonFiniteLossError(
                        f"{nonfinite_in_row} consecutive micro-batches had a non-finite loss at step {state.step} "
                        f"(train.max_nonfinite_in_row={cfg.train.max_nonfinite_in_row}); stopping. Last complete "
                        f"checkpoint: {self.ckpt_dir / latest[0] if latest else 'none'}. Try a lower optim.lr, "
                        "deepspeed.precision=fp32 or bf16, or check the data."
                    )
                continue
            nonfinite_in_row = 0
            state.samples_seen += cfg.data.batch_size * self.world_size
            if not boundary:
                continue
            state.step += 1
            bar.update(1)
            t_flag = time.perf_counter()
            stop = self.stop.agree(self.control)  # one all-reduce of a flag per step: every rank stops together
            window.flag_time += time.perf_counter() - t_flag
            if state.step % cfg.monitor.log_every == 0 or state.step == cfg.train.steps:
                self._log(window, voxels, bar)
            last = state.step == cfg.train.steps
            if cfg.train.val_every and not stop and (state.step % cfg.train.val_every == 0 or last):
                self.validate()  # skipped when stopping: the grace period is for the checkpoint
            if (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) or last or stop:
                self._save()
            if stop and not last:
                self.stopped = True
                logger.warning("stopped after step %d on request; checkpoint saved, rerun to resume", state.step)
                return

    def _write_summary(self, seconds_per_step: float | None) -> None:
        """``<run>/summary.json`` (rank 0): where the run ended, for people and scripts (the demo prints it)."""
        if self.rank != 0:
            return
        summary = {
            "step": self.state.step,
            "val_dice": self.last_dice,
            "val_dice_mean": self.state.val_dice,
            "samples_seen": self.state.samples_seen,
            "nonfinite_skipped": self.state.nonfinite_skipped,
            "seconds_per_step": seconds_per_step,
            "resumed_from": self.resumed_from,
            "world_size": self.world_size,
            "stopped_on_signal": self.stopped,
        }
        checkpoint.write_json(self.run_dir / "summary.json", summary)

    def _log(self, window: _Window, voxels: int, bar: tqdm) -> None:
        """Scalars of the steps since the last log (rank 0 writes; other ranks hold a NullMonitor)."""
        samples = window.count * self.cfg.data.batch_size * self.world_size
        values = {
            "train/loss": window.mean_loss(),
            "train/lr": float(self.engine.get_lr()[0]),
            "train/epoch": self.epoch,
            "train/nonfinite_skipped": float(self.state.nonfinite_skipped),
            "perf/samples_per_s": samples / window.time,
            "perf/voxels_per_s": samples * voxels / window.time,
            "perf/data_wait_fraction": window.data_time / window.time,
            "perf/step_time_s": window.time * self.cfg.train.grad_accum / max(1, window.count),
            # the stop-flag all-reduce, per optimizer step (its cost: see .notes/fault.md)
            "perf/stop_flag_ms": 1e3 * window.flag_time / max(1, window.count / self.cfg.train.grad_accum),
            **memory_stats(self.device),
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        self.monitor.scalars(values, self.state.step)
        bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values['train/lr']:.2e}")
        window.reset()

    def close(self) -> None:
        self.monitor.close()


class _Window:
    """Sums over the micro-batches since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.time = 0.0
        self.data_time = 0.0
        self.flag_time = 0.0
        self.loss_sum = 0.0
        self.count = 0

    def add(self, seconds: float, data_seconds: float, loss: float) -> None:
        self.time += seconds
        self.data_time += data_seconds
        if math.isfinite(loss):
            self.loss_sum += loss
            self.count += 1

    def mean_loss(self) -> float:
        return self.loss_sum / self.count if self.count else math.nan
