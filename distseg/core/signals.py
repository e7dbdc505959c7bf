"""Stop-signal plumbing shared by the trainer's ranks and their loader worker processes."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""What a scheduler or `distseg.train.preemption.supervise` sends to ask for a graceful stop."""


def ignore_stop_signals() -> None:
    """For loader worker processes: the rank they serve decides when to stop and shuts them down itself. (Without
    this the launcher's SIGTERM to the rank's whole process tree kills the workers, and the rank's DataLoader
    raises "worker exited unexpectedly" in the middle of the step it was meant to finish.)"""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
