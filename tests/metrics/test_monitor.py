"""Monitor: real TensorBoard event files read back through tensorboard's EventAccumulator; NullMonitor writes none."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch

from distseg.config import MonitorConfig
from distseg.core.overlay import PALETTE, render_overlay
from distseg.train.monitor import NullMonitor, TensorBoardMonitor, build_monitor, memory_stats, read_events


def _case(h: int = 24, w: int = 30) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image = torch.linspace(-1, 1, h * w).reshape(1, h, w).repeat(4, 1, 1)
    label = torch.zeros(3, h, w)
    label[0, 4:20, 5:25] = 1  # WT
    label[1, 8:16, 10:20] = 1  # TC
    label[2, 10:14, 12:18] = 1  # ET
    pred = torch.roll(label, shifts=2, dims=2) * 0.9  # probabilities, shifted right
    return image, label, pred


def test_rank0_writes_events_that_read_back(tmp_path) -> None:
    mon = build_monitor(MonitorConfig(), tmp_path, rank=0)
    assert isinstance(mon, TensorBoardMonitor)
    mon.scalars({"loss/train": 1.25, "lr": 3e-4}, step=1)
    mon.scalars({"loss/train": 0.5}, step=10)
    mon.overlay("val/overlay", *_case(), step=10)
    mon.text("config", "model: unet", step=0)
    mon.close()
    events = read_events(tmp_path / "tb")
    assert events["loss/train"] == [(1, 1.25), (10, 0.5)]
    assert events["lr"][0][0] == 1 and events["lr"][0][1] == pytest.approx(3e-4)
    [(step, img)] = events["val/overlay"]
    assert step == 10 and img.dtype == np.uint8 and img.shape == (24, 2 * 30 + 2, 3)
    assert np.array_equal(img, render_overlay(*_case()).transpose(1, 2, 0))  # PNG round trip is lossless
    assert events["config/text_summary"] == [(0, "model: unet")]


@pytest.mark.parametrize("cfg,rank", [(MonitorConfig(), 1), (MonitorConfig(), 3), (MonitorConfig(enabled=False), 0)])
def test_null_monitor_writes_nothing(tmp_path, cfg: MonitorConfig, rank: int) -> None:
    mon = build_monitor(cfg, tmp_path, rank=rank)
    assert isinstance(mon, NullMonitor)
    mon.scalars({"loss": 1.0}, 0)
    mon.overlay("x", *_case(), 0)
    mon.text("t", "s", 0)
    mon.flush()
    mon.close()
    assert list(tmp_path.iterdir()) == []


def test_overlay_colours_gt_left_and_prediction_right() -> None:
    image, label, pred = _case()
    rgb = render_overlay(image, label, pred).transpose(1, 2, 0).astype(int)
    left, right = rgb[:, :30], rgb[:, 32:]
    grey = render_overlay(image, torch.zeros_like(label), torch.zeros_like(pred)).transpose(1, 2, 0).astype(int)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    # Outside every region the input shows through unchanged in grey.
    assert np.array_equal(left[0], grey[0, :30]) and np.array_equal(right[0], grey[0, 32:])
    # Region outlines carry the palette colour: WT's top-left corner (GT) and the shifted one (prediction).
    assert tuple(left[4, 5]) == PALETTE[0] and tuple(right[4, 7]) == PALETTE[0]
    assert tuple(left[10, 12]) == PALETTE[2] and tuple(right[10, 14]) == PALETTE[2]
    # GT and prediction differ, so the two panels differ.
    assert not np.array_equal(left, right)


def test_overlay_picks_the_3d_slice_with_most_foreground() -> None:
    image, label, pred = _case()
    vol_img = image[:, None].repeat(1, 5, 1, 1)
    vol_lab = torch.zeros(3, 5, 24, 30)
    vol_lab[:, 3] = label
    vol_pred = torch.zeros(3, 5, 24, 30)
    vol_pred[:, 3] = pred
    assert np.array_equal(render_overlay(vol_img, vol_lab, vol_pred), render_overlay(image, label, pred))


def test_overlay_rejects_mismatched_shapes() -> None:
    image, label, pred = _case()
    with pytest.raises(ValueError, match="overlay"):
        render_overlay(image, label, pred[:, :10])
    with pytest.raises(ValueError, match="channel 7"):
        render_overlay(image, label, pred, channel=7)


def test_config_validation_names_keys() -> None:
    with pytest.raises(ValueError, match=r"monitor\.log_every"):
        MonitorConfig(log_every=0).validate()
    with pytest.raises(ValueError, match=r"monitor\.image_every"):
        MonitorConfig(image_every=-1).validate()


def test_memory_stats_reports_host_memory_growth() -> None:
    # An anonymous mapping is fresh pages whatever the allocator holds in its free lists (a torch or numpy array
    # could reuse memory already resident, and the RSS would not move): touching it must raise the RSS.
    size = 64 * 1024 * 1024
    before = memory_stats("cpu")
    with mmap.mmap(-1, size) as block:
        block.write(b"\x01" * size)
        after = memory_stats("cpu")
    assert after["memory/host_rss_mib"] - before["memory/host_rss_mib"] > 48
    assert after["memory/host_peak_rss_mib"] >= after["memory/host_rss_mib"]
    assert "memory/device_allocated_mib" not in after
