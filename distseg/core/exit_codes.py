"""One table of exit statuses for every distseg command (preprocess, train, predict, evaluate, export, supervise).

A scheduler or a script reads the status without parsing logs: 2 means "fix the command or its input", 3 "look at
the failed cases, the rest is done", 4 "requeue the same command", 5 "rerun the same command". The README's table
mirrors `TABLE`; `tests/test_exit_codes.py` checks that the two agree and that no command returns a
bare number.
"""

from __future__ import annotations

from typing import Final

OK: Final = 0
"""Everything asked for was done."""

ERROR: Final = 1
"""An unexpected error (a Python traceback); a bug or an environment problem, not an input the code knows to check."""

USAGE: Final = 2
"""Bad usage or bad input, found before any work was written: wrong arguments, a config key or value, a missing or
wrong-version store, an unreadable model, an output folder inside an input. The message names the key/path."""

SOME_FAILED: Final = 3
"""Some cases failed (each named with its reason; preprocessing: a manifest row, evaluation: a failed row scored by
the BraTS convention); every good case was written."""

PREEMPTED: Final = 4
"""Training stopped on SIGTERM/SIGUSR1 after saving a complete checkpoint: requeue or rerun the same command to
resume (`distseg.train.preemption`)."""

LOST_RANK: Final = 5
"""Another rank died or hung (`dist.timeout_s`); rerun the same command to resume (`distseg.train.lost_rank`)."""

DIVERGED: Final = 6
"""Training stopped after `train.max_nonfinite_in_row` optimizer steps in a row with non-finite loss or gradients;
the message names the last good checkpoint."""

TABLE: Final[dict[int, str]] = {
    OK: "ok: everything asked for was done",
    ERROR: "unexpected error (traceback): a bug or the environment",
    USAGE: "bad usage or bad input (argument, config key, store, model, output folder), nothing written",
    SOME_FAILED: "some cases failed, each named; the good ones were written",
    PREEMPTED: "training preempted (SIGTERM/SIGUSR1) after a complete checkpoint: requeue / rerun to resume",
    LOST_RANK: "a rank died or hung: rerun the same command to resume",
    DIVERGED: "training stopped on non-finite losses/gradients; the last good checkpoint is named",
}
"""Status -> meaning, as the README's exit-status table shows it. Killed by signal N: 128 + N (the shell's rule)."""
