"""Ensembles (`ModelSet`) and the postprocessing choice made on validation predictions, in-process on arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distseg.config import load_config
from distseg.evaluation.model import ProbabilityCache, choose_postprocessing
from distseg.inference.ensemble import ModelSet, ensemble_members, load_models, write_ensemble
from distseg.inference.loading import LoadedModel, ModelIO, ModelLoadError
from distseg.inference.postprocess import RegionRule
from distseg.inference.predictor import Predictor

REGIONS = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}


def _member(seed: int, patch: int = 16, downsample: int = 1) -> LoadedModel:
    """A tiny 3D conv net (4 channels -> 3 logits) under a ModelIO like a BraTS run's."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv3d(4, 6, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Conv3d(6, 3, 3, padding=1)).eval()
    io = ModelIO(kind="brats3d", channels=["t1", "t1ce", "t2", "flair"], target="regions", regions=REGIONS,
                 mode="patch3d", patch_size=[patch] * 3, downsample=downsample)
    return LoadedModel(io, load_config("configs/debug.yaml"), module=net, source=f"member{seed}")


def _image() -> torch.Tensor:
    return torch.randn(4, 20, 23, 18, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("second", [dict(), dict(patch=12), dict(downsample=2)])
def test_ensemble_probabilities_are_the_mean_of_the_members(second: dict) -> None:
    """Window by window (same window) or case by case (different windows / resolutions): the mean of what each
    member predicts alone."""
    a, b = _member(0), _member(1, **second)
    image = _image()
    alone = [Predictor(m, overlap=0.5, window_batch=3).probabilities(image) for m in (a, b)]
    models = ModelSet([a, b])
    assert models.shares_window() == (not second)
    both = Predictor(models, overlap=0.5, window_batch=3).probabilities(image)
    torch.testing.assert_close(both, (alone[0] + alone[1]) / 2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone[0], alone[1])  # the members differ, so the mean is a real test


def test_members_with_other_targets_are_refused() -> None:
    a, b = _member(0), _member(1)
    b.io.regions = {"tumour": [1]}
    with pytest.raises(ModelLoadError, match="regions differ"):
        ModelSet([a, b])


def test_ensemble_folder_round_trip(tmp_path: Path) -> None:
    members = [tmp_path / "runs" / f"fold_{k}" / "checkpoints" / "step_00000004" for k in range(3)]
    write_ensemble(tmp_path, members, {"folds": [0, 1, 2]})
    assert ensemble_members(tmp_path) == [m.resolve() for m in members]  # stored relative, read back absolute
    (tmp_path / "ensemble.json").write_text('{"format": "other"}')
    with pytest.raises(ModelLoadError, match="ensemble"):
        load_models([tmp_path])


def _ball(shape: tuple[int, int, int], centre: tuple[int, int, int], r: float) -> np.ndarray:
    g = np.indices(shape)
    return sum((g[i] - centre[i]) ** 2 for i in range(3)) <= r * r


def _case(shape=(24, 24, 24)) -> tuple[np.ndarray, dict]:
    """Ground truth: WT ball with a TC core and an ET centre (canonical labels 2 / 1 / 3)."""
    label = np.zeros(shape, np.uint8)
    label[_ball(shape, (12, 12, 12), 7)] = 2
    label[_ball(shape, (12, 12, 12), 4)] = 1
    label[_ball(shape, (12, 12, 12), 2)] = 3
    return label, {"spacing": [1.0, 1.0, 1.0], "source_ndim": 3}


def test_postprocessing_kept_only_when_the_mean_rises_and_no_region_drops(tmp_path: Path) -> None:
    """nnU-Net's rule on hand-built predictions: a far whole-tumour island (false positive) is removed by keeping
    the largest component; a rule that would also delete a real, separate enhancing lesion is refused."""
    cache = ProbabilityCache(tmp_path)
    truths = {}
    for cid in ("a", "b"):
        label, attrs = _case()
        truths[cid] = (label, attrs)
        pred = np.stack([np.isin(label, v) for v in REGIONS.values()]).astype(np.float32)
        pred[0][_ball(label.shape, (3, 3, 3), 1.5)] = 1.0  # WT island far from the tumour: a false positive
        cache.put(cid, pred)
    pp, table = choose_postprocessing(cache, truths.__getitem__, ["a", "b"], REGIONS)
    assert pp.rules["WT"] == RegionRule(keep_largest=True)
    assert "TC" not in pp.rules and "ET" not in pp.rules  # nothing to gain there: left alone
    assert {row["region"] for row in table} == set(REGIONS)

    # Case "c": a second, real enhancing lesion inside the whole tumour. Keeping the largest ET component would
    # raise nothing and lower ET; removing small WT components would also delete it: ET must not drop.
    label, attrs = _case()
    label[_ball(label.shape, (12, 12, 17), 1)] = 3  # separate small ET focus inside WT
    truths["c"] = (label, attrs)
    cache.put("c", np.stack([np.isin(label, v) for v in REGIONS.values()]).astype(np.float32))
    pp, _ = choose_postprocessing(cache, truths.__getitem__, ["c"], REGIONS)
    assert not pp.rules  # every candidate either changes nothing or lowers a region: no rule kept
