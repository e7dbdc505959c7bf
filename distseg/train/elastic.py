"""Which checkpoint to resume from, and resuming it on a different number of ranks (elastic resume).

    plan = plan_resume(ckpt_dir, cfg, world_size)   # collective: rank 0 picks the tag, every rank follows
    cfg = with_grad_accum(cfg, plan.grad_accum)      # before the engine is built
    ds_config = build_ds_config(cfg, world_size) | universal_ds_config(plan)

* The tag: rank 0 picks the newest COMPLETE checkpoint and broadcasts it. Ranks must never choose on their own: with
  NFS attribute caching after a job killed mid-save, ranks could see different "newest" tags and load shards of
  different steps.
* Same rank count: DeepSpeed's own per-rank shards are loaded, as always.
* Another rank count (ZeRO 1-3): rank 0 converts the checkpoint once to DeepSpeed's *universal* format
  (`deepspeed.checkpoint.ds_to_universal`: one folder per parameter with its fp32 master copy, Adam moments and
  step) into ``<tag>/universal/`` (written under a temporary name and renamed, kept with the tag and pruned with
  it), the others wait, and every rank loads it with DeepSpeed's ``checkpoint.load_universal``, which re-partitions
  weights and optimizer moments for the new rank count. The LR scheduler, step and trainer counters come from the
  model-state file and ``trainer_state.json`` as usual. ZeRO 0 (no sharding) needs no conversion. Per-rank RNG
  states are not restored (nothing in the data or augmentation stream uses them).
* The global batch is kept: ``train.grad_accum`` becomes ``saved_world * saved_accum * saved_batch / (world *
  data.batch_size)``; when that is not a whole number the run stops before distributed init and says which rank
  counts (or micro-batch sizes) would keep it.
* The sample stream continues where it stopped: the samples are a pure function of their global position, and
  rank r of W reads global micro-batch ``stream_base + s*W + r`` at its batch s (`distseg.data.sampling`). The
  new rank count starts at ``stream_base = old stream_base + micro_batches * saved_world`` (every micro-batch
  drawn so far, skipped ones included) with its own batch counter at 0. Since an optimizer step is ``accum * W``
  consecutive micro-batches, each step after the resume holds exactly the samples (in the same micro-batches)
  that the uninterrupted run would have used: the runs differ only in floating-point summation order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distseg.config import ExperimentConfig
from distseg.core import checkpoint, dist
from distseg.core.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

UNIVERSAL = "universal"
"""Subfolder of a tag holding its universal-format conversion (`engine.load_checkpoint(tag_dir, tag=UNIVERSAL)`)."""


@dataclass(frozen=True)
class SavedLayout:
    """How the checkpoint's run was laid out: what the global batch and the shards depend on."""

    world_size: int
    grad_accum: int
    batch_size: int
    zero_stage: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.grad_accum * self.batch_size


@dataclass(frozen=True)
class ResumePlan:
    """What this start resumes from (identical on every rank after `plan_resume`)."""

    tag: str | None
    """The checkpoint tag to load; None = start fresh."""
    saved: SavedLayout | None
    """The layout the checkpoint was written with (None when starting fresh)."""
    grad_accum: int
    """Gradient accumulation to use here (keeps the checkpoint's global batch)."""
    universal: bool
    """Load the universal conversion (the rank count differs and the optimizer state is sharded)."""


def saved_layout(tag_dir: Path, marker: dict[str, Any]) -> SavedLayout:
    """The layout from the marker (checkpoints of this version) or from the config in trainer_state.json (older)."""
    if all(k in marker for k in ("grad_accum", "batch_size", "zero_stage")):
        return SavedLayout(int(marker["world_size"]), int(marker["grad_accum"]), int(marker["batch_size"]),
                           int(marker["zero_stage"]))
    try:
        config = json.loads((tag_dir / checkpoint.STATE_FILE).read_text(encoding="utf-8"))["config"]
        return SavedLayout(int(marker["world_size"]), int(config["train"]["grad_accum"]),
                           int(config["data"]["batch_size"]), int(config["deepspeed"]["zero_stage"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{tag_dir}: cannot tell the saved batch layout ({e}); expected "
                              f"{checkpoint.STATE_FILE} with the run's config") from e


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def grad_accum_for(saved: SavedLayout, world_size: int, batch_size: int, tag_dir: Path) -> int:
    """Accumulation that keeps the saved global batch on `world_size` ranks of `batch_size` samples, or a
    CheckpointError naming the settings that would keep it."""
    per_rank, rest = divmod(saved.global_batch, world_size * batch_size)
    if rest == 0:
        return per_rank
    worlds = [w for w in _divisors(saved.global_batch // batch_size)] if saved.global_batch % batch_size == 0 else []
    batches = [b for b in _divisors(saved.global_batch // world_size)] if saved.global_batch % world_size == 0 else []
    options = []
    if worlds:
        options.append(f"a rank count in {worlds[:12]} with data.batch_size={batch_size}")
    if batches:
        options.append(f"data.batch_size in {batches[:12]} on these {world_size} ranks")
    raise CheckpointError(
        f"checkpoint {tag_dir} was trained with a global batch of {saved.global_batch} samples ({saved.world_size} "
        f"ranks x train.grad_accum={saved.grad_accum} x data.batch_size={saved.batch_size}), which {world_size} "
        f"ranks x data.batch_size={batch_size} cannot keep with a whole train.grad_accum. Use "
        f"{' or '.join(options) if options else 'the original rank count'}; or start a NEW run from its weights: "
        f"python -m distseg.core.checkpoint export {tag_dir} <weights.pt>, then model.init_weights=<weights.pt> and "
        "a new "
        "run.name (the optimizer state starts fresh)"
    )


def precheck(cfg: ExperimentConfig, world_size: int) -> None:
    """Before distributed init (every rank, no collectives): refuse a resume that cannot keep the global batch."""
    found = checkpoint.newest_complete(cfg.run_dir / "checkpoints")
    if found is None or cfg.checkpoint.resume != "auto":
        return
    tag_dir = cfg.run_dir / "checkpoints" / found[0]
    saved = saved_layout(tag_dir, found[1])
    if saved.world_size != world_size:
        grad_accum_for(saved, world_size, cfg.data.batch_size, tag_dir)


def plan_resume(ckpt_dir: Path, cfg: ExperimentConfig, world_size: int) -> ResumePlan:
    """Collective: rank 0 chooses the newest complete checkpoint, every rank gets the same plan (or error)."""
    plan: ResumePlan | str
    if dist.rank() == 0:
        try:
            plan = _plan_on_rank0(ckpt_dir, cfg, world_size)
        except CheckpointError as e:
            plan = str(e)
    else:
        plan = ""
    plan = dist.broadcast_object(plan)  # type: ignore[assignment]
    if isinstance(plan, str):
        raise CheckpointError(plan)
    return plan


def _plan_on_rank0(ckpt_dir: Path, cfg: ExperimentConfig, world_size: int) -> ResumePlan:
    found = checkpoint.newest_complete(ckpt_dir)
    if found is None:
        return ResumePlan(None, None, cfg.train.grad_accum, False)
    if cfg.checkpoint.resume == "never":
        raise CheckpointError(f"{ckpt_dir} already holds checkpoints and checkpoint.resume=never; pick a new run.name")
    tag, marker = found
    saved = saved_layout(ckpt_dir / tag, marker)
    if saved.world_size == world_size:
        return ResumePlan(tag, saved, cfg.train.grad_accum, False)
    accum = grad_accum_for(saved, world_size, cfg.data.batch_size, ckpt_dir / tag)
    return ResumePlan(tag, saved, accum, saved.zero_stage > 0)


def with_grad_accum(cfg: ExperimentConfig, plan: ResumePlan) -> ExperimentConfig:
    """`cfg` with the plan's accumulation (a copy; logged when it changes)."""
    if plan.grad_accum == cfg.train.grad_accum:
        return cfg
    assert plan.saved is not None
    logger.warning("resuming a %d-rank checkpoint on %d ranks: train.grad_accum %d -> %d keeps the global batch of "
                   "%d samples", plan.saved.world_size, dist.world_size(), cfg.train.grad_accum, plan.grad_accum,
                   plan.saved.global_batch)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=plan.grad_accum))


def universal_ds_config(plan: ResumePlan) -> dict[str, Any]:
    """The DeepSpeed config keys that make `load_checkpoint` read the universal format."""
    return {"checkpoint": {"load_universal": True}} if plan.universal else {}


def ensure_universal(tag_dir: Path) -> Path:
    """Collective: rank 0 converts `tag_dir` to ``tag_dir/universal`` unless done before; the others wait.
    Returns the universal folder; raises CheckpointError on every rank when the conversion failed."""
    out = tag_dir / UNIVERSAL
    error = None
    if dist.rank() == 0 and not out.is_dir():
        try:
            seconds = convert_to_universal(tag_dir, out)
            logger.info("converted %s to the universal format in %.1f s", tag_dir, seconds)
        except CheckpointError as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error:
        raise CheckpointError(str(error))
    return out


def convert_to_universal(tag_dir: Path, out: Path) -> float:
    """Run DeepSpeed's ds_to_universal on `tag_dir` into `out` (temporary name, then rename). Returns seconds.

    In a subprocess: the converter forks worker pools and prints, neither of which belongs in a rank process.
    """
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for stale in tag_dir.glob(f".{out.name}.tmp*"):  # an earlier conversion killed half-way
        shutil.rmtree(stale, ignore_errors=True)
    cmd = [sys.executable, "-m", "distseg.core.safe_load",  # the converter, its torch.load calls restricted
           "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir), "--output_folder", str(tmp),
           "--inject_missing_state"]
    t0 = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    (tag_dir / "latest_universal").unlink(missing_ok=True)  # the converter's own pointer: not ours
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (result.stdout + result.stderr).strip().splitlines()[-8:]
        raise CheckpointError(f"{tag_dir}: conversion to DeepSpeed's universal checkpoint format failed "
                              f"(exit {result.returncode}): " + " | ".join(tail))
    tmp.rename(out)
    return seconds
