"""Postprocessing over a subject's stacked 2D slices ("subject" scope): stacking, choosing it out of fold, and
applying it where evaluation applies rules (hand-built slices whose answer is known)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distseg.evaluation.postprocessing import ProbabilityCache, Truth, choose_postprocessing
from distseg.inference.postprocess import (
    Postprocessing,
    RegionRule,
    group_by_stack,
    postprocess_stack,
    stack_place,
)

TUMOUR = {"tumour": [1]}


def _patient() -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Slices 3, 4, 5 of one patient: (label, prediction, slice index). The tumour spans slices 3 (a real 40-px
    end) and 4 (400 px); slice 5 is tumour-free but predicted with a 60-px false positive far from it. Per slice,
    the false positive is its slice's largest component and the real 40 px end is smaller than it, so no per-slice
    rule removes the false positive without the real tumour; over the stack it is a separate small component."""
    s3, s4, s5 = (np.zeros((40, 40), np.uint8) for _ in range(3))
    s3[10:15, 10:18] = 1  # 40 px, under slice 4's tumour: one 3D component with it
    s4[5:25, 5:25] = 1  # 400 px
    fp = np.zeros((40, 40), bool)
    fp[30:36, 28:38] = True  # 60 px
    return {"p_3": (s3, s3.astype(bool), 3), "p_4": (s4, s4.astype(bool), 4), "p_5": (s5, fp, 5)}


def _attrs(index: int, subject: str | None = "P") -> dict:
    return {"source_ndim": 2, "subject": subject, "slice_index": index}


def test_subject_rule_is_chosen_out_of_fold_when_per_slice_rules_cannot_remove_a_false_positive(tmp_path: Path):
    cache, truths = ProbabilityCache(tmp_path), {}
    for cid, (label, pred, index) in _patient().items():
        truths[cid] = (label[None], _attrs(index))  # stored frame (Z=1, Y, X)
        cache.put(cid, pred[None, None].astype(np.float32))
    pp, table = choose_postprocessing(cache, Truth.of_pairs(truths), list(truths), TUMOUR)
    assert pp.rules["tumour"] == RegionRule(keep_largest=True, scope="subject")
    rows = {r["rule"]: r["mean_dice"] for r in table}
    assert rows["keep largest component (a subject's slices stacked)"] == pytest.approx(1.0)
    assert rows["keep largest component"] == pytest.approx(880 / 940)  # per slice: the false positive stays
    assert rows["remove components < 50"] == pytest.approx(800 / 900)  # the real 40-px end goes, not the 60 px
    assert rows["remove components < 100"] == pytest.approx(800 / 840)  # both go


def test_without_slice_positions_no_subject_candidate_is_tried(tmp_path: Path):
    """Slices that cannot be stacked (no position) are each their own stack: only per-case candidates."""
    cache, truths = ProbabilityCache(tmp_path), {}
    for cid, (label, pred, _) in _patient().items():
        truths[cid] = (label[None], {"source_ndim": 2, "subject": "P", "slice_index": None})
        cache.put(cid, pred[None, None].astype(np.float32))
    pp, table = choose_postprocessing(cache, Truth.of_pairs(truths), list(truths), TUMOUR)
    assert all("stacked" not in r["rule"] for r in table)
    assert pp.rules.get("tumour", RegionRule()).scope == "case"


def test_a_gap_between_slice_positions_separates_components():
    """Slices 0 and 2 (1 missing) never join: the missing slice is empty in the stack; slices 0 and 1 join."""
    a = np.zeros((1, 1, 8, 8), bool)
    a[0, 0, 2:6, 2:6] = True  # 16 px
    b = np.zeros((1, 1, 8, 8), bool)
    b[0, 0, 3:5, 3:5] = True  # 4 px, overlapping a in-plane
    pp = Postprocessing({"tumour": RegionRule(keep_largest=True, scope="subject")})
    joined = postprocess_stack([a, b], [0, 1], TUMOUR, pp)
    apart = postprocess_stack([a, b], [0, 2], TUMOUR, pp)
    assert joined[1].sum() == 4 and apart[1].sum() == 0 and apart[0].sum() == 16
    # "case" scope on the same stack: each slice alone keeps its own largest component
    per_slice = postprocess_stack([a, b], [0, 1], TUMOUR, Postprocessing({"tumour": RegionRule(keep_largest=True)}))
    assert [m.sum() for m in per_slice] == [16, 4]


def test_slices_that_cannot_be_stacked_are_named():
    a = np.ones((1, 1, 8, 8), bool)
    pp = Postprocessing({"tumour": RegionRule(keep_largest=True, scope="subject")})
    with pytest.raises(ValueError, match="TCGA_1.*two slices at position 4"):
        postprocess_stack([a, a], [4, 4], TUMOUR, pp, what="TCGA_1")
    with pytest.raises(ValueError, match="TCGA_1.*different sizes"):
        postprocess_stack([a, np.ones((1, 1, 8, 9), bool)], [0, 1], TUMOUR, pp, what="TCGA_1")


def test_stacks_group_a_subjects_slices_and_leave_other_cases_alone():
    attrs = {"a_1": _attrs(1, "A"), "b_1": _attrs(1, "B"), "a_2": _attrs(2, "A"),
             "vol": {"source_ndim": 3, "subject": "A", "slice_index": None}, "img": _attrs(3, None)}
    groups = group_by_stack(attrs, lambda c: stack_place(c, attrs[c]))
    assert groups == [["a_1", "a_2"], ["b_1"], ["vol"], ["img"]]
    assert stack_place("a_2", attrs["a_2"]).position == 2 and stack_place("vol", attrs["vol"]).position is None


def test_a_subject_with_two_slices_at_one_position_is_split_with_a_warning_naming_them(tmp_path: Path, caplog):
    """Two scans of one patient under one subject (a subject pattern that drops the scan date): their slices clash.
    The choice and the application go on, slice by slice for that subject, and the warning names the clash."""
    attrs = {"scan1_3": _attrs(3, "P"), "scan1_4": _attrs(4, "P"), "scan2_3": _attrs(3, "P"), "q_1": _attrs(1, "Q"),
             "q_2": _attrs(2, "Q")}
    groups = group_by_stack(attrs, lambda c: stack_place(c, attrs[c]))
    assert groups == [["scan1_3"], ["scan1_4"], ["scan2_3"], ["q_1", "q_2"]]
    assert "scan1_3 and scan2_3 are both slice 3 of P" in caplog.text
    cache, truths = ProbabilityCache(tmp_path), {}
    for cid, (label, pred, index) in _patient().items():
        for scan in ("s1", "s2"):  # the same three slices twice
            truths[f"{scan}{cid}"] = (label[None], _attrs(index))
            cache.put(f"{scan}{cid}", pred[None, None].astype(np.float32))
    pp, table = choose_postprocessing(cache, Truth.of_pairs(truths), list(truths), TUMOUR)
    assert all("stacked" not in r["rule"] for r in table) and pp.rules.get("tumour", RegionRule()).scope == "case"


def test_rule_scope_round_trips_and_old_files_read_as_case_rules():
    pp = Postprocessing({"tumour": RegionRule(min_volume=250.0, scope="subject")})
    assert Postprocessing.from_dict(pp.to_dict()) == pp and pp.has_subject_rules()
    old = Postprocessing.from_dict({"tumour": {"keep_largest": True, "min_volume": 0.0}})
    assert old.rules["tumour"] == RegionRule(keep_largest=True) and not old.has_subject_rules()
    with pytest.raises(ValueError, match="scope 'patient'"):
        Postprocessing.from_dict({"tumour": {"keep_largest": True, "scope": "patient"}})


def test_raw_slices_are_stacked_by_their_patient_folder_not_its_name(tmp_path: Path):
    """`launch/predict.py` on raw 2D inputs: two inputs that each hold a patient folder named P1 are two patients;
    a patient folder given itself (its slices at the input's root) cannot be stacked and is flagged for a warning."""
    from PIL import Image

    from launch.predict import discover_inputs

    pixels = Image.fromarray(np.zeros((8, 8), np.uint8))
    for site, stems in (("siteA", ["P1_1", "P1_2"]), ("siteB", ["P1_3"])):
        (tmp_path / site / "P1").mkdir(parents=True)
        for stem in stems:
            pixels.save(tmp_path / site / "P1" / f"{stem}.png")
    cases, problems = discover_inputs([tmp_path / "siteA", tmp_path / "siteB"], "images2d", ["gray"], None, None,
                                      set())
    assert not problems
    groups = group_by_stack(cases, lambda c: c.place, lambda c: c.case_id)
    assert [[c.case_id for c in g] for g in groups] == [["P1_1", "P1_2"], ["P1_3"]]
    assert not any(c.loose_slice for c in cases)
    direct, _ = discover_inputs([tmp_path / "siteA" / "P1"], "images2d", ["gray"], None, None, set())
    assert [c.loose_slice for c in direct] == [True, True] and all(c.place.position is None for c in direct)
