"""Whole-case validation (distseg.train.validation): symmetric forward counts across ranks, same numbers as
prediction."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from distseg.config import load_config
from distseg.data.store import Store
from distseg.data.targets import labels_to_targets
from distseg.inference.loading import LoadedModel, ModelIO
from distseg.inference.predictor import Predictor
from distseg.metrics import confusion_counts_from_masks
from distseg.models import build_model
from distseg.train.validation import WholeCaseValidator


def _cfg(store, **over):
    overrides = [f"data.store={store}", "data.val_folds=[0,1]", *(f"{k}={v}" for k, v in over.items())]
    return load_config("configs/debug.yaml", overrides)


def test_every_rank_makes_the_same_number_of_forward_calls(brats_data):
    """ZeRO-3 forwards are collectives: ranks pad with dummy forwards up to the busiest rank's count."""
    _, store_path = brats_data
    cfg = _cfg(store_path)
    store = Store.open(store_path)
    net = build_model("unet3d", "debug", in_channels=4, out_channels=3).eval()
    for world in (2, 3):
        calls = []
        for rank in range(world):
            n = [0]

            def counting(x, n=n):
                n[0] += 1
                return net(x)

            validator = WholeCaseValidator(cfg.data, store, rank, world, overlap=0.5, window_batch=2)
            validator.run(counting, torch.device("cpu"), None, "regions", store.regions)
            calls.append(n[0])
        assert len(set(calls)) == 1 and calls[0] > 0, calls


def test_validation_counts_equal_the_predictors(brats_data):
    """Validation during training and launch/predict.py run one code path: same masks, same tp/fp/fn/tn."""
    _, store_path = brats_data
    cfg = _cfg(store_path)
    store = Store.open(store_path)
    torch.manual_seed(0)
    net = build_model("unet3d", "debug", in_channels=4, out_channels=3).eval()
    counts, example = WholeCaseValidator(cfg.data, store, 0, 1, overlap=0.5, window_batch=2).run(
        net, torch.device("cpu"), None, "regions", store.regions)
    predictor = Predictor(LoadedModel(ModelIO.from_store(cfg, store), cfg, module=net), overlap=0.5, window_batch=2)
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for cid in store.case_ids(folds=[0, 1], labelled_only=True):
        case = store.case_arrays(cid)
        pred = predictor.predict(case)
        targets = labels_to_targets(torch.from_numpy(case.label)[None], "regions", store.regions) > 0.5
        expected += confusion_counts_from_masks(torch.from_numpy(pred.masks)[None], targets)
    torch.testing.assert_close(counts, expected)
    image, targets, probs = example
    assert image.shape[1:] == targets.shape[1:] == probs.shape[1:] and targets.shape[0] == 3
    assert np.isfinite(probs.numpy()).all()


@pytest.mark.parametrize("spatial_dims,shape", [(3, (2, 3, 16, 24, 20)), (2, (2, 3, 32, 40))])
def test_crop_validation_honours_downsample(spatial_dims, shape):
    """train.val_mode=crop with data.downsample=2: the model sees the crop pooled by 2 (what it trained on) and the
    logits come back on the crop's own grid, interpolated as whole-case validation does."""
    from distseg.train.validation import crop_logits

    seen = []

    def net(x):
        seen.append(tuple(x.shape))
        return x[:, :2] * 1.0

    ramp = torch.linspace(0, 1, shape[-1]).expand(shape).clone()  # smooth along X: pooling + interpolation ~ identity
    out = crop_logits(net, ramp, downsample=2, spatial_dims=spatial_dims)
    assert seen == [(shape[0], shape[1], *(s // 2 for s in shape[2:]))]
    assert out.shape == (shape[0], 2, *shape[2:]) and out.dtype == torch.float32
    inner = (..., slice(2, -2))  # away from the border, where interpolation extrapolates
    torch.testing.assert_close(out[inner], ramp[:, :2][inner], atol=0.02, rtol=0)
    assert torch.equal(crop_logits(net, ramp, downsample=1, spatial_dims=spatial_dims), ramp[:, :2])


def test_default_crop_covers_the_training_field_of_view_at_downsample():
    from distseg.data.config import DataConfig
    from distseg.data.loader import val_patch_size

    cfg = DataConfig(store="unused", mode="patch3d", patch_size=(16, 16, 16), downsample=2)
    assert val_patch_size(cfg, None, []) == (32, 32, 32)  # type: ignore[arg-type]
    assert val_patch_size(replace(cfg, val_patch_size=(24, 24, 24)), None, []) == (24, 24, 24)  # type: ignore[arg-type]
