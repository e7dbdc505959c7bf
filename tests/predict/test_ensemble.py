"""Ensembles (`ModelSet`) and the postprocessing choice made on validation predictions, in-process on arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distseg.config import load_config
from distseg.evaluation.postprocessing import ProbabilityCache, Truth, choose_postprocessing
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
    pp, table = choose_postprocessing(cache, Truth.of_pairs(truths), ["a", "b"], REGIONS)
    assert pp.rules["WT"] == RegionRule(keep_largest=True)
    assert "TC" not in pp.rules and "ET" not in pp.rules  # nothing to gain there: left alone
    assert {row["region"] for row in table} == set(REGIONS)

    # Case "c": a second, real enhancing lesion inside the whole tumour. Keeping the largest ET component would
    # raise nothing and lower ET; removing small WT components would also delete it: ET must not drop.
    label, attrs = _case()
    label[_ball(label.shape, (12, 12, 17), 1)] = 3  # separate small ET focus inside WT
    truths["c"] = (label, attrs)
    cache.put("c", np.stack([np.isin(label, v) for v in REGIONS.values()]).astype(np.float32))
    pp, _ = choose_postprocessing(cache, Truth.of_pairs(truths), ["c"], REGIONS)
    assert not pp.rules  # every candidate either changes nothing or lowers a region: no rule kept


def _slices() -> dict[str, tuple[np.ndarray, dict]]:
    """Two 2D slices of one patient: an empty slice with a 20-pixel false positive, and a slice whose tumour (400 px)
    has a separate real 30-pixel lesion; predictions: the false positive, and the tumour exactly."""
    empty, tumour = np.zeros((40, 40), np.uint8), np.zeros((40, 40), np.uint8)
    tumour[5:25, 5:25] = 1
    tumour[30:35, 30:36] = 1
    fp = np.zeros((40, 40), bool)
    fp[32:36, 2:7] = True
    return {"s1": (empty, fp), "s2": (tumour, tumour.astype(bool))}


@pytest.mark.parametrize("subject", ["TCGA_X", None])
def test_postprocessing_is_chosen_on_the_per_subject_dice_when_cases_are_slices(tmp_path: Path, subject) -> None:
    """Removing components < 50 px turns the empty slice's Dice from 0 to 1 (the per-slice mean rises by 0.48) but
    deletes the real 30-px lesion: the patient's stacked Dice falls from 0.977 to 0.964, so with a subject the rule
    is refused; slices without a subject are each their own subject and the rule is kept."""
    cache, truths = ProbabilityCache(tmp_path), {}
    for cid, (label, pred) in _slices().items():
        truths[cid] = (label, {"source_ndim": 2, "subject": subject})
        cache.put(cid, pred[None].astype(np.float32))
    pp, table = choose_postprocessing(cache, Truth.of_pairs(truths), ["s1", "s2"], {"tumour": [1]})
    rows = {r["rule"]: r["mean_dice"] for r in table}
    if subject:
        assert not pp.rules
        assert rows["remove components < 50"] == pytest.approx(800 / 830)
    else:
        assert pp.rules["tumour"] == RegionRule(min_volume=50.0)  # ties with < 100 and < 250: the smallest wins
        assert rows["remove components < 50"] == pytest.approx((1 + 800 / 830) / 2)


def test_subject_dice_stacks_a_subjects_cases_and_averages_over_subjects() -> None:
    from distseg.evaluation.postprocessing import SubjectDice

    gt = np.zeros((1, 4, 4), bool)
    gt[0, :2] = True  # 8 px
    half = np.zeros_like(gt)
    half[0, 0] = True  # 4 px, all inside
    d = SubjectDice(1, 1)
    d.add(0, "a", half, gt)  # tp 4, fn 4
    d.add(0, "a", gt, gt)  # tp 8
    d.add(0, "b", np.zeros_like(gt), np.zeros_like(gt))  # both empty: 1
    assert d.n_subjects == 2
    assert d.means()[0, 0] == pytest.approx((24 / 28 + 1.0) / 2)


# ------------------------------------------------------------------------------------------------ decoding
def test_binary_model_on_a_brats_store_predicts_and_scores_the_whole_tumour() -> None:
    """`data.target: binary` trains on label > 0: its output is the whole tumour (0/1), scored against all tumour
    labels, not against label 1 (necrosis) alone."""
    from distseg.evaluation.model import _scored
    from distseg.inference.predictor import decode

    label, _ = _case((16, 16, 16))
    attrs = {"shape": [4, 16, 16, 16], "original_shape_zyx": [16, 16, 16], "crop_box_zyx": [[0, 16]] * 3,
             "store_to_source_axes": [2, 1, 0], "label_convention": "brats2018", "spacing": [1.0, 1.0, 1.0]}
    io = _member(0).io
    io.target = "binary"
    assert io.decode_regions == {"foreground": [1, 2, 3]}
    probs = (label > 0)[None].astype(np.float32)  # a perfect whole-tumour prediction
    masks, labels, source = decode(probs, io, attrs)
    assert set(np.unique(source).tolist()) == {0, 1} and source.sum() == (label > 0).sum()
    scored = _scored("c", source, io, attrs, label, "test")
    assert scored.pred.shape == scored.gt.shape == (1, 16, 16, 16)
    np.testing.assert_array_equal(scored.pred, scored.gt)  # Dice 1: the ground truth is the whole tumour too


def test_resized_2d_case_is_restored_from_probabilities(tmp_path: Path) -> None:
    """A 2D store made with --size: the source-size mask comes from resampled probabilities (smooth boundary), not
    from nearest-resized hard labels (a staircase)."""
    from distseg.data.geometry import paste_to_source
    from distseg.inference.predictor import decode
    from preprocess.discover import discover_images2d
    from preprocess.images2d import prepare_2d_case
    from preprocess.synth import write_synth

    write_synth("images2d", 1, tmp_path, shape=(64, 64))
    case = prepare_2d_case(discover_images2d(tmp_path)[0], ["gray"], 16)[0]
    assert case.attrs["resized_from"] == [64, 64] and case.image.shape[-2:] == (16, 16)
    yy, xx = np.mgrid[0:16, 0:16]
    probs = np.clip(1.2 - np.hypot(yy - 7.3, xx - 8.1) / 6.0, 0, 1)[None, None].astype(np.float32)  # (K, 1, H, W)
    io = ModelIO(kind="images2d", channels=["gray"], target="regions", regions={"tumour": [1]}, mode="image2d",
                 patch_size=[16, 16], resize=16)
    _, labels, source = decode(probs, io, case.attrs)
    expected = paste_to_source(probs[0].astype(np.float32), case.attrs) > 0.5
    np.testing.assert_array_equal(source > 0, expected)
    nearest = paste_to_source(labels, case.attrs) > 0
    assert (nearest != expected).sum() > 8  # the old way differs along the boundary: this test can tell them apart


def test_decoding_clips_nested_regions_before_painting_labels() -> None:
    """A tumour-core voxel that the whole-tumour channel calls background is not tumour: the written labels (and
    so WT) never grow beyond the WT channel (painting the raw channels made WT the union of all three)."""
    from distseg.inference.predictor import decode

    label, _ = _case((16, 16, 16))
    attrs = {"shape": [4, 16, 16, 16], "original_shape_zyx": [16, 16, 16], "crop_box_zyx": [[0, 16]] * 3,
             "store_to_source_axes": [2, 1, 0], "label_convention": "brats2018", "spacing": [1.0, 1.0, 1.0]}
    probs = np.stack([np.isin(label, v) for v in REGIONS.values()]).astype(np.float32)
    probs[1, :3, :3, :3] = 0.9  # TC fires in a corner where WT says background
    probs[2, :2, :2, :2] = 0.9  # so does ET
    masks, labels, source = decode(probs, _member(0).io, attrs)
    assert not masks[1, :3, :3, :3].any() and not masks[2, :2, :2, :2].any()
    np.testing.assert_array_equal(labels > 0, label > 0)  # WT of the labels = the WT channel
    np.testing.assert_array_equal(source > 0, (label > 0).transpose(2, 1, 0))
