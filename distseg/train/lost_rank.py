"""A rank that dies or hangs: the others stop within `dist.timeout_s`, name it, and exit with `EXIT_LOST_RANK`.

Every collective has the process-group timeout (`dist.init_distributed(timeout_s)`): gloo raises in the waiting
rank when a peer's connection closes (at once) or when the timeout passes (a hung peer); NCCL's watchdog aborts
the process after the timeout with its own message. When the trainer sees such an error it calls `roll_call`:
every surviving rank checks in at the rendezvous key-value store (the TCPStore that rank 0 hosts for
`init_process_group`, reachable without the broken group), waits `ROLL_CALL_S`, and the ranks that never checked
in are the lost ones. The message names them and the step; rerunning the same command resumes from the newest
complete checkpoint (a save cut short by the failure has no COMPLETE.json and is ignored).
"""

from __future__ import annotations

import datetime
import logging
import os
import time

import torch

from distseg.core import exit_codes

logger = logging.getLogger(__name__)

EXIT_LOST_RANK = exit_codes.LOST_RANK
"""Exit status of a rank that stopped because another rank died or hung; rerun the command to resume."""

ROLL_CALL_S = 15.0
"""Seconds survivors wait for each other at the roll call. Rank 0 hosts the store, so it waits the full time
(the others can only check in while it is up)."""

_MARKERS = ("gloo", "connection closed", "connection reset", "timed out", "broken pipe", "nccl", "watchdog")


class LostRankError(RuntimeError):
    """Another rank died or stopped answering; the message names it (if known), the step and what to do."""


def is_collective_failure(error: BaseException) -> bool:
    """True for the errors a collective raises when a peer is gone or hangs (torch's DistError family; gloo raises
    plain RuntimeErrors such as "Connection closed by peer" or "Timed out waiting 600000ms for recv")."""
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(m in text for m in _MARKERS)


def roll_call(rank: int, world_size: int, step: int, window_s: float = ROLL_CALL_S) -> list[int] | None:
    """Check in at the rendezvous store and return the ranks that did not within `window_s` (sorted), or None
    when the store itself is unreachable (rank 0, which hosts it, is gone)."""
    from torch.distributed import TCPStore

    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "0"))
    try:
        store = TCPStore(host, port, is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=max(1.0, window_s / 3)))
        store.set(f"distseg/roll_call/{rank}", str(step))
    except (RuntimeError, OSError) as e:  # DistStoreError / DistNetworkError are RuntimeErrors
        logger.debug("roll call: store %s:%s unreachable: %s", host, port, e)
        return None
    keys = {r: f"distseg/roll_call/{r}" for r in range(world_size)}
    deadline = time.monotonic() + window_s
    missing = sorted(keys)
    while True:
        try:
            missing = [r for r, key in keys.items() if not store.check([key])]
        except (RuntimeError, OSError):  # the store went away meanwhile: rank 0 gave up first
            return [r for r in missing if r != rank] or None
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)


def report(error: BaseException, rank: int, world_size: int, step: int, timeout_s: float,
           resume_hint: str) -> LostRankError:
    """Run the roll call and build the error that names the lost ranks and the step (also logged here)."""
    missing = roll_call(rank, world_size, step)
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    if missing is None:
        who = ("rank 0 (it hosts the rendezvous store at MASTER_ADDR:MASTER_PORT) is unreachable: it died or its "
               "node was lost")
    elif missing:
        who = f"rank(s) {missing} did not answer the roll call within {ROLL_CALL_S:.0f} s: they died or hang"
    else:
        who = "every rank answered the roll call, so the failure was the network or the backend"
    msg = (f"rank {rank}: a collective failed at step {step + 1} (after step {step} completed; "
           f"dist.timeout_s={timeout_s:g}): {who}. Backend error: {first}. Exiting with status {EXIT_LOST_RANK}; "
           f"{resume_hint}")
    logger.error("%s", msg)
    return LostRankError(msg)
