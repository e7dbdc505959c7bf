"""Checkpoints that count only when complete.

Layout under ``<run>/checkpoints/``::

    step_00000040/                 one tag per saved optimizer step
        mp_rank_00_model_states.pt, *_optim_states.pt ...   DeepSpeed's files (every rank writes its shard)
        rng_rank00000.pt ...       per-rank RNG states (python, numpy, torch, accelerator)
        trainer_state.json         step, epoch, samples seen, loader position, val Dice, resolved config
        COMPLETE.json              written LAST by rank 0, after a barrier once every rank's save returned;
                                   lists every file with its size so a later truncation is caught too
    latest                         the newest complete tag (atomic rename); DeepSpeed's tools read it as well
    best                           the complete tag with the best mean validation Dice

Every rank fsyncs the tag's files before the barrier that precedes the marker, so a marker never names bytes that
a power loss could take back. Resume scans for the newest tag whose marker exists and whose files match it; a tag
folder without a marker (a save interrupted by a crash or SIGKILL) is ignored, and deleted once a newer complete
tag is kept. A marker that cannot be read (EIO, EACCES) is not "incomplete": that tag is never deleted.
DeepSpeed stores `client_state` only in some ranks' model-state files (depends on the ZeRO stage), so the
trainer's own state goes to files we control.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distseg.core import dist, exit_codes
from distseg.core.fileio import atomic_write, fsync_path
from distseg.core.safe_load import weights_only_loads

logger = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
STATE_FILE = "trainer_state.json"
TAG_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed here (the message says why and what to do)."""


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def _write_text(path: Path, text: str) -> None:
    """Atomically, fsynced before the rename."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=True)


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON atomically (temporary file + fsync + rename)."""
    _write_text(path, json.dumps(obj, indent=1))


# ------------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """This process's RNG states in a form `torch.load(weights_only=True)` accepts (tensors, ints, tuples)."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(np_state["state"]["pos"]),
        "numpy_gauss": (int(np_state["has_gauss"]), float(np_state["gauss"])),
        "torch": torch.get_rng_state(),
    }
    acc = dist.accelerator()
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
            "has_gauss": has_gauss,
            "gauss": gauss,
        }
    )
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        dist.accelerator().set_rng_state(state["accelerator"])


# ------------------------------------------------------------------------------------------------ finding
COMPLETE, INCOMPLETE, UNREADABLE = "complete", "incomplete", "unreadable"


@dataclass(frozen=True)
class TagStatus:
    """What reading one tag's marker found.

    `state`: COMPLETE (marker read, every listed file has its recorded size), INCOMPLETE (the marker or a listed
    file was read and is absent, malformed or the wrong size: a save that never finished, or damage) or UNREADABLE
    (reading failed for another reason, e.g. EIO, EACCES, ESTALE on shared storage: nothing is known, so the tag
    is neither resumed from nor deleted). `step` comes from the tag's name, so every state can be ordered."""

    tag: str
    step: int
    state: str
    marker: dict[str, Any] | None = None
    reason: str = ""


def _tag_step(name: str) -> int | None:
    """The step in a tag folder's name (``step_00000040`` -> 40), None for any other name."""
    digits = name.removeprefix(TAG_PREFIX)
    return int(digits) if name.startswith(TAG_PREFIX) and digits.isdigit() else None


def inspect_tag(tag_dir: Path) -> TagStatus:
    """Read `tag_dir`'s marker and stat every file it lists; see `TagStatus` for the three outcomes."""
    step = _tag_step(tag_dir.name)
    step = -1 if step is None else step
    try:
        marker = json.loads((tag_dir / MARKER).read_text(encoding="utf-8"))
        listed = marker["files"].items()
        marker_step = int(marker["step"])
    except (FileNotFoundError, NotADirectoryError):
        return TagStatus(tag_dir.name, step, INCOMPLETE, reason=f"no {MARKER}")
    except OSError as e:  # EIO, EACCES, ESTALE...: not evidence of anything
        return TagStatus(tag_dir.name, step, UNREADABLE, reason=f"{MARKER}: {e}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return TagStatus(tag_dir.name, step, INCOMPLETE, reason=f"malformed {MARKER} ({e!r})")
    for name, size in listed:
        try:
            actual = (tag_dir / name).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return TagStatus(tag_dir.name, step, INCOMPLETE, marker, f"{name} listed in {MARKER} is missing")
        except OSError as e:
            return TagStatus(tag_dir.name, step, UNREADABLE, marker, f"{name}: {e}")
        if actual != size:
            return TagStatus(tag_dir.name, step, INCOMPLETE, marker,
                             f"{name} has {actual} bytes but {size} were saved")
    if marker_step != step:
        return TagStatus(tag_dir.name, step, INCOMPLETE, marker, f"{MARKER} says step {marker_step}")
    return TagStatus(tag_dir.name, step, COMPLETE, marker)


def scan_tags(ckpt_dir: Path) -> list[TagStatus]:
    """Every tag folder in `ckpt_dir`, oldest first; [] when `ckpt_dir` does not exist. A folder that cannot be
    listed raises CheckpointError: an empty answer would start the run over (and prune) next to good checkpoints."""
    try:
        names = sorted(e.name for e in os.scandir(ckpt_dir) if e.is_dir())
    except FileNotFoundError:
        return []
    except OSError as e:
        raise CheckpointError(f"{ckpt_dir}: cannot list the checkpoints ({e}); check the storage and rerun") from e
    return sorted((inspect_tag(ckpt_dir / n) for n in names if _tag_step(n) is not None), key=lambda t: t.step)


def read_marker(tag_dir: Path) -> dict[str, Any] | None:
    """The marker of a COMPLETE checkpoint whose listed files all exist with their recorded sizes, else None."""
    status = inspect_tag(tag_dir)
    if status.state == COMPLETE:
        return status.marker
    if status.state == UNREADABLE:
        logger.warning("checkpoint %s: cannot read it (%s); skipping it", tag_dir, status.reason)
    elif status.marker is not None:  # it was complete once: say what changed
        logger.warning("checkpoint %s: %s; ignoring it", tag_dir, status.reason)
    return None


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, str, dict[str, Any]]]:
    """(step, tag, marker) of every complete checkpoint in `ckpt_dir`, oldest first (unreadable ones: a warning)."""
    found = []
    for status in scan_tags(ckpt_dir):
        if status.state == COMPLETE:
            found.append((status.step, status.tag, status.marker))
        elif status.state == UNREADABLE:
            logger.warning("checkpoint %s: cannot read it (%s); skipping it", ckpt_dir / status.tag, status.reason)
    return found


def newest_complete(ckpt_dir: Path) -> tuple[str, dict[str, Any]] | None:
    found = complete_checkpoints(ckpt_dir)
    return (found[-1][1], found[-1][2]) if found else None


# ------------------------------------------------------------------------------------------------ save/load
def save(engine, ckpt_dir: Path, step: int, state: dict[str, Any], keep_last: int, keep_best: bool,
         layout: dict[str, int] | None = None) -> str:
    """Save tag ``step_<step>`` on EVERY rank (collective), mark it complete, move `latest`, prune old tags.

    `state`: the trainer's JSON-able counters and config (identical on all ranks); ``state["val_dice"]`` (mean
    validation Dice) and ``state["val_step"]`` (the step that Dice was measured at) decide `best`: only a Dice
    measured at this very step makes the checkpoint a candidate. `layout` (grad_accum, batch_size, zero_stage) goes
    into the marker beside world_size: an elastic resume keeps the global batch from it (`distseg.train.elastic`).
    """
    rank = dist.rank()
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():  # debris of an interrupted save of the same step: start clean
        shutil.rmtree(tag_dir)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"trainer": state}, save_latest=False)
    rng_path = tag_dir / f"rng_rank{rank:05d}.pt"
    torch.save(rng_state(), rng_path.with_suffix(".tmp"))
    rng_path.with_suffix(".tmp").replace(rng_path)
    if rank == 0:
        _write_text(tag_dir / STATE_FILE, json.dumps(state, indent=1))
    fsync_tag_files(tag_dir)
    dist.barrier()  # every rank's files are written and durable: only now may the checkpoint count
    if rank == 0:
        mark_complete(ckpt_dir, tag_dir, {
            "step": step,
            "world_size": dist.world_size(),
            **(layout or {}),
            "val_dice": state.get("val_dice"),
            "val_step": state.get("val_step"),
            "time": time.time(),
        })
        prune(ckpt_dir, keep_last, keep_best)
    dist.barrier()
    logger.info("checkpoint %s complete", tag_dir)
    return tag


def fsync_tag_files(tag_dir: Path) -> None:
    """fsync every file in `tag_dir` (each rank, before the barrier that precedes the marker).

    Every rank flushes every file: on file systems that cache writes in the writing client (NFS, Lustre) only the
    writer's fsync makes its bytes durable, and which of DeepSpeed's files a rank wrote is DeepSpeed's business.
    An fsync of a file another rank already flushed is cheap.

    Other ranks write into the same folder meanwhile: their temporary files (``.name.<hex>.json``, ``*.tmp``) are
    skipped, and a file renamed away between the listing and its fsync is not an error (its writer flushed it before
    the rename: `_write_text`, or flushes its final name itself)."""
    for p in sorted(tag_dir.iterdir()):
        if p.name.startswith(".") or p.suffix == ".tmp" or not p.is_file():
            continue
        try:
            fsync_path(p)
        except FileNotFoundError:
            logger.debug("checkpoint file %s was renamed while being flushed (another rank's write)", p)


def mark_complete(ckpt_dir: Path, tag_dir: Path, marker: dict[str, Any]) -> None:
    """Rank 0, after every rank's `fsync_tag_files`: record each file's size in the marker, written last and
    fsynced with its folder, then move `latest` (also durable before anything is pruned)."""
    fsync_path(tag_dir)  # the files' names (renames included) are durable before the marker that lists them
    files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != MARKER}
    _write_text(tag_dir / MARKER, json.dumps({**marker, "files": files}, indent=1))
    fsync_path(tag_dir)
    _write_text(ckpt_dir / "latest", tag_dir.name)
    fsync_path(ckpt_dir)


def best_tag(complete: list[tuple[int, str, dict[str, Any]]]) -> str | None:
    """The complete tag with the highest mean validation Dice (the newest one on ties).

    Only tags validated at their own step count: a marker whose Dice belongs to an earlier step (``val_step`` !=
    its step) or that has none is never "best"."""
    scored = [(m["val_dice"], step, tag) for step, tag, m in complete
              if m.get("val_dice") is not None and m.get("val_step", step) == step]
    return max(scored)[2] if scored else None


def prune(ckpt_dir: Path, keep_last: int, keep_best: bool) -> None:
    """Keep the newest `keep_last` complete tags (+ the best one); delete only what is provably superseded.

    A tag is deleted only when a complete tag with a higher step is kept AND its own marker was read: complete
    but older than the kept ones, or incomplete (a save that never finished). A tag whose marker could not be read
    (EIO, EACCES...) is kept with a warning: a failed read is no evidence that it is incomplete. Incomplete tags
    newer than the newest complete one are kept too (nothing supersedes them yet)."""
    try:
        tags = scan_tags(ckpt_dir)
    except CheckpointError as e:
        logger.warning("not pruning: %s", e)
        return
    complete = [(t.step, t.tag, t.marker) for t in tags if t.state == COMPLETE]
    keep = {tag for _, tag, _ in complete[-keep_last:]}
    best = best_tag(complete) if keep_best else None
    if best:
        keep.add(best)
        _write_text(ckpt_dir / "best", best)
    newest_kept = max((t.step for t in tags if t.tag in keep), default=-1)
    for t in tags:
        if t.tag in keep:
            continue
        if t.state == UNREADABLE:
            logger.warning("checkpoint %s: cannot read its marker (%s); keeping it", ckpt_dir / t.tag, t.reason)
            continue
        if t.step >= newest_kept:  # nothing complete supersedes it
            continue
        logger.info("pruning checkpoint %s (%s)", t.tag, t.state if t.state == COMPLETE else t.reason)
        shutil.rmtree(ckpt_dir / t.tag, ignore_errors=True)


def load(engine, ckpt_dir: Path, tag: str, universal: str | None = None, restore_rng: bool = True) -> dict[str, Any]:
    """Load tag `tag` into `engine` on every rank (collective); restore this rank's RNG; return trainer state.

    `universal`: the name of the tag's universal-format subfolder to load instead of the per-rank shards (elastic
    resume on another rank count; the engine must have been built with ``checkpoint.load_universal``).
    `restore_rng=False` leaves the RNG states alone (on another rank count they belong to the old ranks).
    """
    tag_dir = ckpt_dir / tag
    load_dir, load_tag = (tag_dir, universal) if universal else (ckpt_dir, tag)
    with weights_only_loads(str(tag_dir)):  # DeepSpeed's files, read without running pickled code
        load_path, _ = engine.load_checkpoint(
            str(load_dir), tag=load_tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {load_dir / load_tag}")
    state = json.loads((tag_dir / STATE_FILE).read_text(encoding="utf-8"))
    if restore_rng:
        rng_path = tag_dir / f"rng_rank{dist.rank():05d}.pt"
        set_rng_state(torch.load(rng_path, weights_only=True))
    return state


def consolidated_fp32_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights (and buffers) of a COMPLETE checkpoint of any ZeRO stage and rank count, in memory.

    ZeRO 1-3: DeepSpeed's zero_to_fp32 gathers the fp32 master partitions of every rank. ZeRO 0 (plain data
    parallel) keeps no partitions: with bf16/fp16 the fp32 master weights are the optimizer's `fp32_groups`, in the
    order of `distseg.train.optim.param_groups` (matrices, then vectors); in fp32 the module weights are the master
    copy.
    """
    import contextlib
    import io

    if read_marker(tag_dir) is None:
        raise CheckpointError(f"{tag_dir}: not a complete checkpoint (no valid {MARKER}); pick another tag")
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), weights_only_loads(str(tag_dir)):  # prints its progress
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        return {k: v.float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}
    saved = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    module: dict[str, torch.Tensor] = saved["module"]
    out = {k: v.float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in module.items()}
    groups = (saved.get("optimizer") or {}).get("fp32_groups")
    if groups:
        buffers = set(saved.get("buffer_names") or [])
        params = [k for k in module if k not in buffers]
        ordered = [k for k in params if module[k].dim() > 1] + [k for k in params if module[k].dim() <= 1]
        masters = [t for group in groups for t in group]
        if len(masters) == len(ordered) and all(masters[i].shape == module[k].shape for i, k in enumerate(ordered)):
            out.update({k: masters[i].float().contiguous() for i, k in enumerate(ordered)})
        else:
            logger.warning("%s: fp32 master weights do not line up with the module's parameters; exporting the "
                           "module's %s weights widened to fp32", tag_dir, next(iter(module.values())).dtype)
    return out


def export_fp32(tag_dir: Path, out: Path) -> Path:
    """Consolidate a COMPLETE checkpoint's weights into one fp32 state dict file (``torch.save``), loadable
    with ``weights_only=True`` (e.g. as `model.init_weights`). Works for every ZeRO stage and any rank count."""
    state = consolidated_fp32_state(tag_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out.with_suffix(".tmp"))
    out.with_suffix(".tmp").replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m distseg.core.checkpoint export <run>/checkpoints/<tag> OUT.pt``: consolidated fp32 weights."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 3 or argv[0] != "export":
        sys.stderr.write("usage: python -m distseg.core.checkpoint export <run>/checkpoints/<tag> OUT.pt\n")
        return exit_codes.USAGE
    try:
        out = export_fp32(Path(argv[1]), Path(argv[2]))
    except CheckpointError as e:
        sys.stderr.write(f"error: {e}\n")
        return exit_codes.USAGE
    sys.stdout.write(f"{out}\n")
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
