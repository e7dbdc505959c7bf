"""TensorBoard monitoring (the `monitor:` section): scalars, segmentation overlays, text, memory statistics.

Only rank 0 writes (`TensorBoardMonitor`, event files under ``<run_dir>/tb/``); every other rank gets a
`NullMonitor` with the same methods doing nothing, so the trainer calls the monitor unconditionally.
"""

from __future__ import annotations

import io
import logging
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)

# Region colours (RGB) in channel order: BraTS WT green, TC yellow, ET red; further channels cycle the rest.
PALETTE = ((0, 200, 0), (255, 220, 0), (230, 0, 0), (0, 120, 255), (255, 0, 255), (0, 230, 230))
FILL_ALPHA = 0.35
SEPARATOR_PX = 2


@dataclass
class MonitorConfig:
    """What is logged and how often."""

    enabled: bool = True
    """False: every rank gets a NullMonitor (no event files)."""
    log_every: int = 10
    """Log training scalars every N optimizer steps."""
    image_every: int = 200
    """Log a GT-vs-prediction overlay every N optimizer steps (0 = never)."""

    def validate(self, prefix: str = "monitor") -> None:
        """Raise ValueError naming ``<prefix>.<field>`` for the first invalid field."""
        if not isinstance(self.enabled, bool):
            raise ValueError(f"{prefix}.enabled: expected true/false, got {self.enabled!r}")
        for key, low in (("log_every", 1), ("image_every", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{prefix}.{key}: expected an integer >= {low}, got {value!r}")


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


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boolean (H, W) -> pixels of the mask that have a 4-neighbour outside it (image border counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def paint_masks(grey: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """grey (H, W) (or an RGB background (H, W, 3)) in [0, 1], masks bool (K, H, W) -> float RGB (H, W, 3):
    translucent fill + solid outline per channel, drawn in channel order so nested BraTS regions (WT ⊃ TC ⊃ ET)
    stay visible."""
    rgb = np.repeat(grey[..., None], 3, axis=-1) if grey.ndim == 2 else np.array(grey, dtype=np.float32)
    for k, mask in enumerate(masks):
        colour = np.asarray(PALETTE[k % len(PALETTE)], dtype=np.float32) / 255.0
        rgb[mask] = (1.0 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * colour
        rgb[_outline(mask)] = colour
    return rgb


def _pick_slice(image: np.ndarray, label: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, ...]:
    """For 3D inputs (C, Z, H, W) keep the axial slice with the most ground-truth foreground (prediction if none)."""
    area = label.reshape(label.shape[0], label.shape[1], -1).sum((0, 2))
    if not area.any():
        area = pred.reshape(pred.shape[0], pred.shape[1], -1).sum((0, 2))
    z = int(np.argmax(area)) if area.any() else label.shape[1] // 2
    return image[:, z], label[:, z], pred[:, z]


def render_overlay(image: Any, label: Any, pred: Any, channel: int = 0) -> np.ndarray:
    """RGB uint8 (3, H, 2W + 2): ground truth (left) and prediction (right) over input channel `channel` in grey.

    image (C, H, W) float; label, pred (K, H, W) binary masks or probabilities (> 0.5 counts as foreground).
    3D inputs (C, Z, H, W) / (K, Z, H, W) are reduced to the slice with the most ground-truth foreground.
    """
    image, label, pred = _numpy(image), _numpy(label), _numpy(pred)
    if image.ndim == 4:
        if label.ndim != 4 or pred.ndim != 4:
            raise ValueError(f"overlay: 3D image {image.shape} needs 3D label/pred (K, Z, H, W), got {label.shape}, "
                             f"{pred.shape}")
        image, label, pred = _pick_slice(image, label, pred)
    if image.ndim != 3 or label.ndim != 3 or label.shape != pred.shape or label.shape[1:] != image.shape[1:]:
        raise ValueError(f"overlay: expected image (C, H, W) and label, pred (K, H, W) with equal H, W; got "
                         f"{image.shape}, {label.shape}, {pred.shape}")
    if not 0 <= channel < image.shape[0]:
        raise ValueError(f"overlay: channel {channel} out of range for an image with {image.shape[0]} channels")
    grey = image[channel].astype(np.float32)
    low, high = float(grey.min()), float(grey.max())
    grey = (grey - low) / (high - low) if high > low else np.zeros_like(grey)
    left, right = paint_masks(grey, label > 0.5), paint_masks(grey, pred > 0.5)
    gap = np.ones((grey.shape[0], SEPARATOR_PX, 3), dtype=np.float32)
    rgb = np.concatenate([left, gap, right], axis=1)
    return np.ascontiguousarray((rgb * 255.0 + 0.5).astype(np.uint8).transpose(2, 0, 1))


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
