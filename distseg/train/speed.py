"""Speed switches of a training run: cuDNN autotuning, torch's fused AdamW kernel and torch.compile.

None of them changes what is learnt beyond floating-point summation order; each has a config key
(`train.cudnn_benchmark`, `optim.fused`, `model.compile`) and is measured by `make gpu-check`
(`tests/benchmarks/bench_trainer_speed.py`). Channels-last convolutions, the fourth switch, live with the models
(`distseg.models.memory_format`) because prediction uses them too.

Why `engine.compile` rather than `torch.compile(model)` before `deepspeed.initialize`: the latter wraps the model
in an `OptimizedModule` whose state-dict keys gain an ``_orig_mod.`` prefix, so its checkpoints would not load into
an uncompiled model (prediction, export, a resume with compilation off). DeepSpeed's `engine.compile` calls
`nn.Module.compile`, which compiles the module's call in place: same parameters, same keys, and ZeRO-3's
parameter hooks stay where DeepSpeed put them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


def cudnn_benchmark_wanted(value: bool | str, device_type: str) -> bool:
    """`train.cudnn_benchmark` resolved: "auto" = on with CUDA (fixed training patch shapes), off elsewhere."""
    if value == "auto":
        return device_type == "cuda"
    return bool(value)


def apply_backend_flags(value: bool | str, device_type: str) -> bool:
    """Set `torch.backends.cudnn.benchmark` from `train.cudnn_benchmark`; returns the value set."""
    wanted = cudnn_benchmark_wanted(value, device_type)
    torch.backends.cudnn.benchmark = wanted
    return wanted


def fused_wanted(value: bool | str, device_type: str, offload: bool) -> bool:
    """`optim.fused` resolved: "auto" = on with CUDA unless the optimizer is offloaded (DeepSpeed's CPU Adam then)."""
    if offload:
        return False
    if value == "auto":
        return device_type == "cuda"
    return bool(value)


def compile_kwargs(value: bool | str) -> dict[str, Any] | None:
    """torch.compile keyword arguments for `model.compile` (None = do not compile).

    `dynamic=False`: training patches have one shape, so the graph is specialised to it; validation windows of
    other shapes compile their own graphs (torch recompiles per new shape, up to its recompile limit, then runs
    those shapes eagerly)."""
    if value is False:
        return None
    kwargs: dict[str, Any] = {"dynamic": False}
    if isinstance(value, str):
        kwargs["mode"] = value
    return kwargs


def compile_engine(engine: Any, value: bool | str) -> bool:
    """Compile the DeepSpeed engine's module in place as `model.compile` asks; returns True when compiled."""
    kwargs = compile_kwargs(value)
    if kwargs is None:
        return False
    engine.compile(compile_kwargs=kwargs)
    logger.info("torch.compile of the model (model.compile=%s, %s); the first steps include compilation", value,
                kwargs)
    return True
