"""Read DeepSpeed's checkpoint files without executing pickled code.

DeepSpeed reads its own files with ``torch.load(..., weights_only=False)`` (its checkpoint engine, ``zero_to_fp32``):
a checkpoint from a shared bucket or from someone else's run could then run arbitrary code on every node that
resumes or predicts from it. Inside `weights_only_loads()` every ``torch.load`` of the process, DeepSpeed's
included, is forced to PyTorch's restricted unpickler (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), which accepts tensors,
containers and plain values plus the few DeepSpeed classes its ZeRO files carry (`DEEPSPEED_SAFE_GLOBALS`). A
file that needs anything else is refused with `UnsafeCheckpointError` naming the file's type; a user who trusts the
folder can set ``DISTSEG_TRUST_CHECKPOINTS=1`` to read it the old way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)

TRUST_ENV = "DISTSEG_TRUST_CHECKPOINTS"
"""Set to 1 to let DeepSpeed unpickle checkpoint files with arbitrary objects (only for folders you trust)."""

_FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds a pickled object outside the allow-list."""


def deepspeed_safe_globals() -> list[type]:
    """The non-tensor classes DeepSpeed 0.19 pickles into ZeRO 0-3 checkpoints (bf16/fp16/fp32): the ZeRO stage
    enum, the fp32 fragment addresses of ZeRO 1/2 and the (static or dynamic) loss scaler state. Plain data: their
    unpickling sets attributes and runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def trusted() -> bool:
    """Whether the user opted out of the restricted unpickler (``DISTSEG_TRUST_CHECKPOINTS=1``)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in {"1", "true", "yes"}


@contextlib.contextmanager
def weights_only_loads(where: str) -> Iterator[None]:
    """Every ``torch.load`` inside reads with the restricted unpickler (DeepSpeed's own calls included).

    `where`: the checkpoint (folder) being read, named in the error. Raises `UnsafeCheckpointError` when a file
    holds an object outside the allow-list. Not for concurrent use from several threads of one process (it sets a
    process environment variable for the duration; the trainer and the predictors load from one thread)."""
    if trusted():
        logger.warning("%s=1: reading %s with full unpickling (only for checkpoints you trust)", TRUST_ENV, where)
        yield
        return
    before = os.environ.get(_FORCE_ENV)
    os.environ[_FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        detail = f"global {found.group(1)}" if found else str(e).strip().splitlines()[0] if str(e).strip() else "?"
        raise UnsafeCheckpointError(
            f"{where}: a checkpoint file holds a pickled object that distseg does not load ({detail}); only tensors, "
            f"plain values and DeepSpeed's ZeRO bookkeeping are read. If you trust this checkpoint, rerun with "
            f"{TRUST_ENV}=1") from e
    finally:
        if before is None:
            os.environ.pop(_FORCE_ENV, None)
        else:
            os.environ[_FORCE_ENV] = before


def main(argv: list[str] | None = None) -> int:
    """``python -m distseg.core.safe_load MODULE [ARGS...]``: run a DeepSpeed tool module (e.g. its universal
    checkpoint converter) with every ``torch.load`` restricted as in `weights_only_loads` (its worker processes,
    forked, inherit both the allow-list and the forced mode)."""
    import runpy
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m distseg.core.safe_load MODULE [ARGS...]", file=sys.stderr)
        return 2
    module = argv[0]
    sys.argv = [module, *argv[1:]]
    with weights_only_loads(" ".join(argv)):
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
