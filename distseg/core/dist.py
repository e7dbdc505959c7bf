"""Small distributed helpers: rank/world, the accelerator device, symmetric all-reduces.

Device and backend come from `deepspeed.get_accelerator()`, so the same code runs on GPUs (nccl) and on CPU (gloo).
Every helper that communicates is a collective: all ranks must call it in the same order.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as torch_dist

logger = logging.getLogger(__name__)


def accelerator():
    """The DeepSpeed accelerator object (imported lazily: importing deepspeed is slow and has side effects)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def env_rank() -> int:
    """Global rank from the launcher's environment (valid before `init_distributed`); 0 when not launched."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """World size from the launcher's environment (valid before `init_distributed`); 1 when not launched."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_cpu_threads() -> int:
    """On a CPU accelerator, give each local rank its share of the cores (unless OMP_NUM_THREADS says otherwise).

    Without this every rank starts one thread per core, and N ranks on N cores oversubscribe them many times
    over: a measured 10-20x slower step on 2 cores. On GPUs the host threads matter little; nothing is changed.
    """
    if accelerator().device_name() != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    local = int(os.environ.get("LOCAL_SIZE", "1"))
    threads = max(1, (os.cpu_count() or 1) // max(1, local))
    torch.set_num_threads(threads)
    return threads


def init_distributed(timeout_s: float | None = None) -> None:
    """Join the process group with the accelerator's backend (nccl on GPUs, gloo on CPU).

    `timeout_s` (`dist.timeout_s`): how long a collective waits for the other ranks before failing (gloo raises
    in the waiting rank; NCCL's watchdog aborts it). Works without a launcher too: a world of one.
    """
    import datetime

    import deepspeed

    if "RANK" not in os.environ:  # plain `python launch/train.py`: a world of one on loopback
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    kwargs = {}
    if timeout_s is not None:
        kwargs["timeout"] = timeout = datetime.timedelta(seconds=timeout_s)
        # torch's new_group() does not inherit the world group's timeout: it defaults to these module constants
        # (30 min gloo, 10 min NCCL), and DeepSpeed builds its data-parallel groups with new_group(ranks). Found by
        # tests/train/test_fault.py: a hung rank left the others waiting in ZeRO's gradient all-reduce for 30 min.
        from torch.distributed import distributed_c10d

        distributed_c10d.default_pg_timeout = timeout
        if distributed_c10d.default_pg_nccl_timeout is not None:
            distributed_c10d.default_pg_nccl_timeout = timeout
    if not torch_dist.is_initialized():
        skip_unused_shm_op()
        deepspeed.init_distributed(dist_backend=accelerator().communication_backend_name(), **kwargs)
        release_shm_allreduce_buffer()


SHM_OP = "deepspeed_shm_comm"


def skip_unused_shm_op() -> bool:
    """Tell DeepSpeed not to build its CPU shared-memory all-reduce op; returns True when skipped.

    On CPU, DeepSpeed's `TorchBackend` JIT-compiles (``deepspeed_shm_comm``: 1-2 minutes of g++ on the first run
    in each environment, again whenever another environment rebuilt the shared torch_extensions cache) and
    initialises (69 MB of /dev/shm per rank) this op in `init_distributed`. It serves only DeepSpeed-Inference's
    `inference_all_reduce` (tensor-parallel inference layers); every collective of training and of distseg's
    inference goes through torch.distributed (gloo) with or without it. DeepSpeed skips an op marked incompatible.
    ``DISTSEG_DS_SHM_COMM=1`` keeps DeepSpeed's default."""
    if os.environ.get("DISTSEG_DS_SHM_COMM") == "1" or accelerator().device_name() != "cpu":
        return False
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_OP] = False
    return True


def release_shm_allreduce_buffer() -> None:
    """Unlink this rank's /dev/shm name of DeepSpeed's CPU shared-memory all-reduce workspace.

    On CPU, DeepSpeed (ops/csrc/cpu/comm/shm.cpp, 0.19.8) creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
    <port>_<rank>`` (69 MB per rank) and never unlinks it: every CPU run leaked 69 MB of RAM per rank, and a day of
    test runs filled 20 GB of this 24 GB machine's memory. Each rank maps every peer's workspace while the process
    group is being initialised, so after a barrier each rank removes its own name: the mappings stay valid until the
    processes exit (POSIX shm semantics), and nothing outlives them, not even after SIGKILL.
    """
    if accelerator().device_name() != "cpu" or not torch_dist.is_initialized():
        return
    torch_dist.barrier()  # every rank has opened its peers' workspaces
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{torch_dist.get_rank()}")
    # Missing: no shared-memory op was built on this machine (or another naming), so nothing leaked.
    Path("/dev/shm", name).unlink(missing_ok=True)

_CONTROL: dict[str, object] = {}


def control_group(timeout_s: float | None = None):
    """A process group for small host-side control messages (the per-step stop flag): the default group when it is
    gloo already (CPU), else a gloo group over all ranks, so agreeing on a flag never waits for the GPU.

    Collective the first time (every rank must call it, in the same order as other collectives); cached after.
    """
    if "group" not in _CONTROL:
        group = None
        if torch_dist.is_initialized() and torch_dist.get_backend() != "gloo":
            import datetime

            kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
            group = torch_dist.new_group(backend="gloo", **kwargs)
        _CONTROL["group"] = group
    return _CONTROL["group"]


def shutdown() -> None:
    """Leave the process group. Without this the backend's threads are torn down at interpreter exit, which
    occasionally aborted a finished CPU rank ("terminate called without an active exception", exit -6)."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    _CONTROL.clear()


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device() -> torch.device:
    """This rank's accelerator device (``cuda:<local_rank>`` on GPUs, ``cpu`` on CPU)."""
    acc = accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    acc.set_device(local_rank())
    return torch.device(acc.device_name(local_rank()))


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place SUM over ranks (collective); returns `t`. float64 tensors stay float64 (exact counts)."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """In-place MAX over ranks (collective); returns `t`."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from `src` to every rank (collective)."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]

