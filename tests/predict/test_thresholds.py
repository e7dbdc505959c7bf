"""Per-region probability thresholds chosen out of fold: the choice (hand-built miscalibrated predictions whose
answer is known) and the decoding that applies them, resized 2D cases included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distseg.evaluation.postprocessing import ProbabilityCache, Truth, choose_postprocessing
from distseg.inference.loading import ModelIO
from distseg.inference.postprocess import Postprocessing, RegionRule, binarise
from distseg.inference.predictor import decode, decode_stack

REGIONS = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
ATTRS = {"shape": [4, 16, 16, 16], "original_shape_zyx": [16, 16, 16], "crop_box_zyx": [[0, 16]] * 3,
         "store_to_source_axes": [2, 1, 0], "label_convention": "brats2018", "spacing": [1.0, 1.0, 1.0],
         "source_ndim": 3}


def _box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


def _overconfident_core(shape=(16, 16, 16)) -> tuple[np.ndarray, np.ndarray]:
    """(label, probabilities): WT predicted exactly (0.9); TC = the true core at 0.9 plus a halo at 0.65 around it
    (a model that overcalls the core); ET = the true enhancing part at 0.9, inside the true core."""
    label = np.zeros(shape, np.uint8)
    label[_box(shape, (2, 2, 2), (14, 14, 14))] = 2  # oedema
    label[_box(shape, (5, 5, 5), (11, 11, 11))] = 1  # core (necrosis)
    label[_box(shape, (6, 6, 6), (9, 9, 9))] = 3  # enhancing
    probs = np.full((3, *shape), 0.05, np.float32)
    probs[0][label > 0] = 0.9
    probs[1][_box(shape, (4, 4, 4), (12, 12, 12))] = 0.65  # halo
    probs[1][np.isin(label, [1, 3])] = 0.9
    probs[2][label == 3] = 0.9
    return label, probs


def test_a_threshold_is_chosen_out_of_fold_when_the_model_overcalls_a_region(tmp_path: Path):
    cache, truths = ProbabilityCache(tmp_path), {}
    for cid in ("a", "b"):
        label, probs = _overconfident_core()
        truths[cid] = (label, ATTRS)
        cache.put(cid, probs)
    pp, table = choose_postprocessing(cache, Truth.of_pairs(truths), ["a", "b"], REGIONS)
    assert pp.rules["TC"].threshold == 0.7  # the first candidate above the halo (0.65) that keeps the core (0.9)
    assert "WT" not in pp.rules and "ET" not in pp.rules  # exact already: every threshold ties, none is kept
    rows = {(r["region"], r["rule"]): r for r in table}
    assert rows[("TC", "threshold 0.7")]["dice_TC"] == pytest.approx(1.0)
    assert rows[("TC", "threshold 0.6")]["dice_TC"] < 1.0  # the halo stays
    assert rows[("WT", "threshold 0.4")]["dice_WT"] == pytest.approx(1.0)
    # A threshold that would lower another region is refused: at 0.95 ET (inside TC) would vanish; not a candidate
    # here, so check the rule directly: TC's threshold above the core's probability empties TC and ET with it.
    probs = _overconfident_core()[1]
    masks = binarise(probs, REGIONS, Postprocessing({"TC": RegionRule(threshold=0.95)}))
    assert not masks[1].any() and not masks[2].any() and masks[0].sum() == (probs[0] > 0.5).sum()


def test_decoding_applies_the_chosen_thresholds():
    from tests.predict.test_ensemble import _member

    label, probs = _overconfident_core()
    io = _member(0).io
    plain = decode(probs, io, ATTRS)[1]
    tuned = decode(probs, io, ATTRS, Postprocessing({"TC": RegionRule(threshold=0.7)}))[1]
    np.testing.assert_array_equal(tuned, label)  # canonical labels exactly the truth
    assert (plain != label).sum() == 8**3 - 6**3  # the halo was painted as core at 0.5
    # the path of `predict.py --postprocess` and evaluation's postprocessed scores: thresholds, then the rules
    pp = Postprocessing({"TC": RegionRule(threshold=0.7, keep_largest=True)})
    (_, stacked, _), = decode_stack([probs], [ATTRS], [None], io, pp)
    np.testing.assert_array_equal(stacked, label)


def test_a_resized_2d_case_uses_the_threshold_after_resampling(tmp_path: Path):
    from distseg.data.geometry import paste_to_source
    from preprocess.discover import discover_images2d
    from preprocess.images2d import prepare_2d_case
    from preprocess.synth import write_synth

    write_synth("images2d", 1, tmp_path, shape=(64, 64))
    case = prepare_2d_case(discover_images2d(tmp_path)[0], ["gray"], 16)[0]
    yy, xx = np.mgrid[0:16, 0:16]
    probs = np.clip(1.2 - np.hypot(yy - 7.3, xx - 8.1) / 6.0, 0, 1)[None, None].astype(np.float32)
    io = ModelIO(kind="images2d", channels=["gray"], target="regions", regions={"tumour": [1]}, mode="image2d",
                 patch_size=[16, 16], resize=16)
    _, _, source = decode(probs, io, case.attrs, Postprocessing({"tumour": RegionRule(threshold=0.8)}))
    resampled = paste_to_source(probs[0], case.attrs)
    np.testing.assert_array_equal(source > 0, resampled > 0.8)
    assert (resampled > 0.5).sum() > (resampled > 0.8).sum() > 0


def test_thresholds_round_trip_and_old_files_read_as_one_half():
    pp = Postprocessing({"TC": RegionRule(keep_largest=True, threshold=0.7)})
    assert Postprocessing.from_dict(pp.to_dict()) == pp
    assert pp.thresholds(REGIONS).tolist() == pytest.approx([0.5, 0.7, 0.5])
    assert pp.rules["TC"].describe() == "threshold 0.7, keep largest component"
    old = Postprocessing.from_dict({"WT": {"keep_largest": True, "min_volume": 0.0}})
    assert old.rules["WT"].threshold == 0.5
    with pytest.raises(ValueError, match="threshold 1.5"):
        Postprocessing.from_dict({"WT": {"threshold": 1.5}})


def test_a_rule_that_raises_the_mean_but_lowers_a_region_is_refused(tmp_path: Path):
    """nnU-Net's acceptance rule has two halves: the mean over regions rises AND no region drops. Here TC at 0.7
    removes a large false halo (TC Dice 0.22 -> 0.99, the mean rises) but also a piece of true core that holds
    enhancing tumour, so ET (clipped to TC) falls 1.0 -> 0.86: refused."""
    shape = (16, 16, 16)
    label = np.zeros(shape, np.uint8)
    label[_box(shape, (2, 2, 2), (14, 14, 14))] = 2  # oedema around
    label[_box(shape, (5, 5, 5), (11, 11, 11))] = 1  # core: 216 voxels
    kept, lost = _box(shape, (6, 6, 6), (8, 8, 9)), _box(shape, (9, 9, 9), (10, 11, 11))  # 12 + 4 enhancing
    label[kept | lost] = 3
    probs = np.full((3, *shape), 0.05, np.float32)
    probs[0][label > 0] = 0.9
    probs[1][label > 0] = 0.65  # the halo: every oedema voxel called core
    probs[1][np.isin(label, [1, 3])] = 0.9
    probs[1][lost] = 0.65  # core with enhancing tumour the model is less sure of
    probs[2][label == 3] = 0.9
    cache = ProbabilityCache(tmp_path)
    cache.put("a", probs)
    pp, table = choose_postprocessing(cache, Truth.of_pairs({"a": (label, ATTRS)}), ["a"], REGIONS)
    rows = {(r["region"], r["rule"]): r for r in table}
    base, strict = rows[("TC", "threshold 0.6")], rows[("TC", "threshold 0.7")]  # 0.6 keeps the halo: = base
    assert strict["mean_dice"] > base["mean_dice"] + 0.05  # the mean alone would take it
    assert strict["dice_ET"] < base["dice_ET"] - 0.1
    assert pp.rules.get("TC", RegionRule()).threshold == 0.5
