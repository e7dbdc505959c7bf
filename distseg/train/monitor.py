"""TensorBoard monitoring (the `monitor:` section): scalars, segmentation overlays, text, memory statistics.

Only rank 0 writes (`TensorBoardMonitor`, event files under ``<run_dir>/tb/``); every other rank gets a
`NullMonitor` with the same methods doing nothing, so the trainer calls the monitor unconditionally.
"""

from __future__ import annotations

import io
import logging
import os
import resource
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from distseg.config import MonitorConfig
from distseg.core.overlay import render_overlay

log = logging.getLogger(__name__)


class Monitor(Protocol):
    """What the trainer calls; implemented by `TensorBoardMonitor` (rank 0) and `NullMonitor` (others)."""

    def scalars(self, values: dict[str, float], step: int) -> None: ...
    def overlay(self, tag: str, image: Any, label: Any, pred: Any, step: int) -> None: ...
    def text(self, tag: str, text: str, step: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class NullMonitor:
    """Null object for non-logging ranks (and `enabled: false`): accepts every call, writes nothing."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def overlay(self, tag: str, image: Any, label: Any, pred: Any, step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardMonitor:
    """Rank-0 monitor writing TensorBoard event files to `tb_dir`."""

    def __init__(self, tb_dir: str | Path) -> None:
        # Imported here: the tensorboard writer pulls in protobuf and is only needed on the logging rank.
        from torch.utils.tensorboard import SummaryWriter

        self.tb_dir = Path(tb_dir)
        self.tb_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.tb_dir))
        log.info("TensorBoard event files in %s", self.tb_dir)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), global_step=step)

    def overlay(self, tag: str, image: Any, label: Any, pred: Any, step: int) -> None:
        self.writer.add_image(tag, render_overlay(image, label, pred), global_step=step, dataformats="CHW")

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def build_monitor(cfg: MonitorConfig, run_dir: str | Path, rank: int) -> TensorBoardMonitor | NullMonitor:
    """Rank 0 with `cfg.enabled` -> TensorBoardMonitor under ``<run_dir>/tb``; everyone else -> NullMonitor."""
    cfg.validate()
    if cfg.enabled and rank == 0:
        return TensorBoardMonitor(Path(run_dir) / "tb")
    return NullMonitor()


def read_events(tb_dir: str | Path) -> dict[str, list[tuple[int, Any]]]:
    """Read every event file in `tb_dir` back: ``{tag: [(step, value), ...]}`` in step order.

    Scalars -> float; images -> uint8 array (H, W, 3) decoded from the stored PNG; text -> str.
    """
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = Path(tb_dir)
    if not tb_dir.is_dir():
        raise FileNotFoundError(f"read_events: no TensorBoard directory at {tb_dir}")
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    out: dict[str, list[tuple[int, Any]]] = {}
    for tag in tags.get("scalars", []):
        out[tag] = [(e.step, float(e.value)) for e in acc.Scalars(tag)]
    for tag in tags.get("images", []):
        out[tag] = [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")))
                    for e in acc.Images(tag)]
    for tag in tags.get("tensors", []):
        # add_text is stored as a string tensor under "<tag>/text_summary".
        out[tag] = [(e.step, b"".join(e.tensor_proto.string_val).decode()) for e in acc.Tensors(tag)]
    return {tag: sorted(values, key=lambda sv: sv[0]) for tag, values in out.items()}


def _proc_status_mib(field: str) -> float | None:
    """A `VmRSS`/`VmHWM`-style field of /proc/self/status in MiB (None where /proc is absent)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # the kernel reports kB
    except OSError:
        return None
    return None


def memory_stats(device: torch.device | str) -> dict[str, float]:
    """Memory in MiB: accelerator allocated/reserved/peak when `device` is CUDA, plus host RSS and peak RSS always.

    Keys: ``memory/device_allocated_mib``, ``memory/device_reserved_mib``, ``memory/device_peak_mib`` (CUDA only),
    ``memory/host_rss_mib``, ``memory/host_peak_rss_mib``.
    """
    device = torch.device(device)
    out: dict[str, float] = {}
    if device.type == "cuda" and torch.cuda.is_available():
        mib = 1024.0**2
        out["memory/device_allocated_mib"] = torch.cuda.memory_allocated(device) / mib
        out["memory/device_reserved_mib"] = torch.cuda.memory_reserved(device) / mib
        out["memory/device_peak_mib"] = torch.cuda.max_memory_allocated(device) / mib
    rss = _proc_status_mib("VmRSS")
    peak = _proc_status_mib("VmHWM")
    if peak is None:  # no /proc (macOS): ru_maxrss is bytes there, kB on Linux
        scale = 1024.0**2 if os.uname().sysname == "Darwin" else 1024.0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    if rss is not None:
        out["memory/host_rss_mib"] = rss
    out["memory/host_peak_rss_mib"] = peak
    return out
