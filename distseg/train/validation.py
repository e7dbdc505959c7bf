"""Whole-case validation during training: every validation case segmented by the sliding window of
`distseg.inference.window`, the same code `launch/predict.py` and `launch/evaluate.py` run, so "best checkpoint"
means best on whole cases, not on one centred crop.

Cases are sharded across ranks (case i on rank i mod world). Forwards under ZeRO-3 are collectives, so every rank
must make the same number of forward calls: each rank knows every validation case's shape from the store metadata,
computes every rank's call count with `forward_calls`, and pads its own with zero-input forwards up to the largest.
No communication is needed to agree. Counts (tp, fp, fn, tn per region) are summed on the device and all-reduced
once by the caller's `MetricAccumulator`, so the Dice is the global Dice over all voxels of all cases (nnU-Net).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from distseg.data.config import DataConfig
from distseg.data.resample import downsample_image, pooled_shape, upsample_logits
from distseg.data.store import Store
from distseg.data.targets import labels_to_targets
from distseg.inference.postprocess import clip_to_containers
from distseg.inference.window import SlidingWindow, case_logits, forward_calls, window_for, window_predictor
from distseg.metrics import confusion_counts_from_masks

logger = logging.getLogger(__name__)


class WholeCaseValidator:
    """Validation over whole cases of the store's validation folds, for one rank."""

    def __init__(self, data: DataConfig, store: Store, rank: int, world_size: int, overlap: float = 0.5,
                 window_batch: int = 2) -> None:
        self.data = data
        self.store = store
        cases = store.case_ids(folds=data.val_folds, labelled_only=True)
        if not cases:
            raise ValueError(f"data.val_folds: no labelled case of {data.store} is in folds {list(data.val_folds)}")
        self.sw = SlidingWindow(window=window_for(data.mode, data.patch_size), overlap=overlap,
                                window_batch=window_batch)
        self.cases = cases[rank::world_size]
        dims = 3 if data.mode == "patch3d" else 2

        def calls_of(case_id: str) -> int:
            return forward_calls(pooled_shape(store.case(case_id).shape[1:], data.downsample, dims), self.sw)

        calls = [sum(calls_of(c) for c in cases[r::world_size]) for r in range(world_size)]
        self.pad_calls = max(calls) - calls[rank]
        self.channels = len(store.channels)

    def run(self, net: Callable[[torch.Tensor], Any], device: torch.device, input_dtype: torch.dtype | None,
            target: str, regions: dict[str, list[int]]) -> tuple[torch.Tensor | None, tuple | None]:
        """Segment this rank's cases. Returns the (K, 4) float64 counts summed over them (None when this rank has
        no case) and an example (image (C, Z, Y, X), targets (K, Z, Y, X), probabilities) for the overlay."""
        predict = window_predictor(net, self.data.mode, input_dtype)  # type: ignore[arg-type]
        total, example = None, None
        for cid in self.cases:
            case = self.store.case_arrays(cid)
            logits = case_logits(predict, torch.from_numpy(case.normalised()), self.sw, self.data.downsample,
                                 3 if self.data.mode == "patch3d" else 2, device=device)
            label = torch.from_numpy(case.label).to(device)
            targets = labels_to_targets(label[None], target, regions)  # (1, K, Z, Y, X)
            masks = logits > 0  # sigmoid > 0.5; decoded as prediction decodes them (nested regions clipped)
            if target == "regions":
                clip_to_containers(masks, regions)
            counts = confusion_counts_from_masks(masks[None], targets > 0.5)
            total = counts if total is None else total + counts
            if example is None:
                example = (torch.from_numpy(case.normalised()), targets[0], torch.sigmoid(logits))
        if self.pad_calls:  # ZeRO-3: match the forward calls of the busiest rank
            dummy = torch.zeros(self.sw.window_batch, self.channels, *self.sw.window, device=device)
            for _ in range(self.pad_calls):
                predict(dummy)
        return total, example


def crop_logits(net: Callable[[torch.Tensor], Any], image: torch.Tensor, downsample: int, spatial_dims: int,
                input_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`train.val_mode: crop`: logits of a batch of validation crops on the crops' own (stored) grid.

    image float32 (B, C, Z, Y, X) for 3D models, (B, C, H, W) for 2D -> float32 (B, K, same spatial shape). With
    `downsample` f > 1 each crop is average-pooled by f exactly as training batches are (`data.downsample`), the
    model runs at 1/f and the logits are interpolated back (`distseg.data.resample.upsample_logits`, as in
    whole-case validation and prediction), so tp/fp/fn are counted against the full-resolution labels.
    """
    x = image
    if downsample > 1:
        planes = image if spatial_dims == 3 else image[:, :, None]  # 2D: (B, C, 1, H, W), pooled in-plane
        x = torch.stack([downsample_image(p, downsample, spatial_dims) for p in planes])
        x = x if spatial_dims == 3 else x[:, :, 0]
    out = net(x if input_dtype is None else x.to(input_dtype))
    out = (out[0] if isinstance(out, list | tuple) else out).float()
    if downsample == 1:
        return out
    out = out if spatial_dims == 3 else out[:, :, None]
    shape = image.shape[2:] if spatial_dims == 3 else (1, *image.shape[2:])
    up = upsample_logits(out, downsample, spatial_dims, shape)
    return up if spatial_dims == 3 else up[:, :, 0]
