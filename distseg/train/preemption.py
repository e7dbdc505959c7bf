"""Graceful stop on SIGTERM / SIGUSR1: every rank finishes the current optimizer step, saves a complete checkpoint
and exits with `EXIT_REQUEUE` (4, "stopped to be requeued"); rerunning the same command resumes from it.

Rank side (`StopRequest`): the handlers only set a flag; the trainer all-reduces it (MAX) once per optimizer step,
so a signal that reached ANY rank stops ALL ranks after the same step. Repeated signals change nothing (schedulers
and the supervisor may both deliver one); a checkpoint interrupted by SIGKILL never counts (COMPLETE.json is written
last), so the previous complete one stays the resume point whatever happens after the first signal.

Launcher side (`supervise`): DeepSpeed 0.19.8's launchers do not pass a stop request on. The `deepspeed` runner
sets no handler on the single-node / `--no_ssh` path, so SIGTERM kills it at once and its ranks run on orphaned;
`deepspeed.launcher.launch` turns SIGTERM/SIGINT into SIGTERM to each rank's process tree (loader workers
included), one rank after another with a 30 s wait each, then SIGKILL, and exits 1. `supervise` wraps the launcher
command instead: the launcher runs in its own session with SIGUSR1 *ignored* (a disposition that survives exec,
and neither launcher sets one for SIGUSR1), so a stop becomes SIGUSR1 to the whole process group, which only the
ranks act on. Its exit status is the launcher's, i.e. 4 after a graceful stop. A second signal SIGKILLs the group.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from distseg.core import exit_codes
from distseg.core.signals import STOP_SIGNALS

logger = logging.getLogger(__name__)

EXIT_REQUEUE = exit_codes.PREEMPTED
"""Exit status of a run stopped by a signal after saving a complete checkpoint: requeue it / run it again."""



class StopRequest:
    """A stop flag set by SIGTERM/SIGUSR1 and agreed on by all ranks once per optimizer step.

    Install it in the main thread (signal handlers live there) as early as possible, so a signal during start-up
    is not lost: `StopRequest().install()`.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        """The first stop signal received by this process (None = none)."""
        self.agreed = False
        """True once some rank's request has been seen by all ranks (after `agree`)."""
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the handlers that were there before `install` back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread: set a flag only (no logging: its lock may be held).
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agree(self, group=None) -> bool:
        """Collective: True on every rank when any rank has been asked to stop. One all-reduce of a 1-element CPU
        tensor over `group` (a gloo group: no device synchronisation; `distseg.core.dist.control_group`)."""
        import torch  # here, not at import: launch/supervise.py must start (and catch signals) fast
        import torch.distributed as torch_dist

        flag = torch.tensor([1.0 if self.requested else 0.0])
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX, group=group)
        if flag.item() > 0 and not self.agreed:
            self.agreed = True
            here = signal.Signals(self.signum).name if self.signum else "another rank's signal"
            logger.warning("stop requested (%s): saving a checkpoint after this step, then exiting with status %d",
                           here, EXIT_REQUEUE)
        return self.agreed


def supervise(cmd: Sequence[str]) -> int:
    """Run the launcher command `cmd` (e.g. ``deepspeed --num_gpus 8 launch/train.py ...``) and turn SIGTERM,
    SIGUSR1 or SIGINT received here into a graceful stop of every rank it started; a second one SIGKILLs them.

    Returns the launcher's exit status (`EXIT_REQUEUE` after a graceful stop; 128 + N when killed by signal N).
    """
    if not cmd:
        raise ValueError("supervise: no command to run")
    received: list[int] = []
    child: list[subprocess.Popen] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if not child:  # not started yet: `supervise` forwards it right after the start
            return
        sig = signal.SIGUSR1 if len(received) == 1 else signal.SIGKILL
        try:
            os.killpg(child[0].pid, sig)
        except ProcessLookupError:  # already gone
            return
        name = signal.Signals(signum).name
        if sig == signal.SIGUSR1:
            sys.stderr.write(f"supervise: {name}: asking every rank to save at the end of its step and exit "
                             f"{EXIT_REQUEUE} (send it again to kill at once)\n")
        else:
            sys.stderr.write(f"supervise: second {name}: killing the job; the previous complete checkpoint stays "
                             "the resume point\n")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    # SIGUSR1 is ignored while the child starts, so that it inherits SIG_IGN through exec; then handled here.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # Its own session: a terminal's Ctrl-C reaches only this process (the launchers would turn SIGINT into SIGTERM
    # for every rank). Hence also: kill THIS process to stop the job; if it is SIGKILLed, kill the group it prints.
    proc = subprocess.Popen(list(cmd), start_new_session=True)
    child.append(proc)
    sys.stderr.write(f"supervise: job started as process group {proc.pid}\n")
    signal.signal(signal.SIGUSR1, forward)
    if received:  # a signal came while the child was starting
        forward(received.pop(), None)
    while True:
        try:
            code = proc.wait()
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries wait() itself
            time.sleep(0.01)
    return 128 - code if code < 0 else code
