"""Whole-case validation (distseg.train.validation): symmetric forward counts across ranks, same numbers as
prediction."""

from __future__ import annotations

import numpy as np
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
