"""Run a DeepSpeed launcher so that a stop signal becomes a graceful stop of every rank (thin entry point).

    python launch/supervise.py deepspeed --num_gpus 8 launch/train.py --config configs/X.yaml [key=value ...]

SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) to this process: every rank finishes its step, saves a checkpoint and exits 4;
this process then exits 4 too ("stopped to be requeued"). A second signal kills the job at once. Use it wherever a
scheduler signals the launcher: Kubernetes (SIGTERM to the container's first process), SLURM (`--signal`),
or a terminal. See `distseg.train.preemption` for why the plain `deepspeed` launcher is not enough.
"""

from __future__ import annotations

import sys

from distseg.core import exit_codes
from distseg.train.preemption import supervise


def main(argv: list[str] | None = None) -> int:
    cmd = list(sys.argv[1:] if argv is None else argv)
    if not cmd or cmd[0] in ("-h", "--help"):
        sys.stderr.write(f"usage: distseg-supervise LAUNCHER [ARGS ...]\n\n{__doc__ or ''}")
        return exit_codes.OK if cmd else exit_codes.USAGE
    return supervise(cmd)


if __name__ == "__main__":
    sys.exit(main())
