"""`launch/crossval.py` end to end on a synthetic store with a test split: folds trained by the real DeepSpeed
launcher, resume of unfinished folds, out-of-fold predictions, choices made on them only, the fold ensemble used by
`launch/predict.py` and `launch/evaluate.py`, and a test split that no choice touches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distseg.data.store import Store
from tests.predict.conftest import PYTHON, ok, run_cmd

TEST_SUBJECTS = ["BraTS2021_00000", "BraTS2021_00001"]
TRAIN = ["configs/debug.yaml", "train.steps=4", "train.val_every=2", "checkpoint.every=2", "monitor.image_every=0"]


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="session")
def cv(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Store (9 cases, 3 folds, 2 test subjects) -> fold 0 alone (--only-train) -> the whole command with --test."""
    root = tmp_path_factory.mktemp("crossval")
    ok(run_cmd([PYTHON, "-m", "preprocess", "synth", "--kind", "brats", "--n", "9", "--dst", str(root / "raw"),
                "--shape", "48x48x32"]))
    ok(run_cmd([PYTHON, "-m", "preprocess", "brats", "--src", str(root / "raw"), "--dst", str(root), "--name", "b",
                "--serial", "--folds", "3", "--fold-assignment", "balanced", "--test-subjects",
                ",".join(TEST_SUBJECTS)]))
    store, out = root / "b.zarr", root / "cv"
    cmd = [PYTHON, "launch/crossval.py", "--config", TRAIN[0], "--ranks", "1", "--output", str(out),
           f"data.store={store}", *TRAIN[1:]]
    first = ok(run_cmd([*cmd, "--only-train", "--folds", "0"], timeout=900))
    fold0 = _tree(out / "runs" / "fold_0" / "checkpoints")
    only_fold0 = sorted(p.name for p in (out / "runs").iterdir())
    second = ok(run_cmd([*cmd, "--test"], timeout=1500))
    return {"root": root, "store": store, "out": out, "first": first, "second": second, "fold0": fold0,
            "only_fold0": only_fold0}


@pytest.mark.slow
def test_folds_resume_and_see_no_test_case(cv: dict) -> None:
    out, store = cv["out"], Store.open(cv["store"])
    assert cv["only_fold0"] == ["fold_0"] and "oof" not in cv["first"]  # --folds 0 --only-train: that fold only
    assert "fold 0: done" in cv["second"]  # the rerun skipped the finished fold ...
    assert _tree(out / "runs" / "fold_0" / "checkpoints") == cv["fold0"]  # ... and rewrote none of its files
    plan = json.loads((out / "crossval.json").read_text())
    assert plan["folds"] == [0, 1, 2] and plan["status"] == {"0": "done", "1": "done", "2": "done"}
    pool = set(store.case_ids(labelled_only=True))
    assert pool and not pool & set(TEST_SUBJECTS)
    for k in range(3):
        seen = json.loads((out / "runs" / f"fold_{k}" / "cases.json").read_text())
        assert set(seen["validation"]) == set(store.case_ids(folds=[k], labelled_only=True))  # its own fold only
        assert set(seen["train"]) == pool - set(seen["validation"])
        assert not (set(seen["train"]) | set(seen["validation"])) & set(TEST_SUBJECTS)
        assert seen["test_split_excluded"] == len(TEST_SUBJECTS)


@pytest.mark.slow
def test_out_of_fold_predictions_make_the_choices(cv: dict) -> None:
    out, store = cv["out"], Store.open(cv["store"])
    pool = set(store.case_ids(labelled_only=True))
    rows = pq.read_table(out / "oof" / "metrics.parquet").to_pylist()
    cases = [r["case_id"] for r in rows if r["region"] == "WT"]
    assert sorted(cases) == sorted(pool)  # every pool case once, each by the model that never trained on it
    meta = json.loads((out / "oof" / "evaluation.json").read_text())
    assert meta["role"] == "validation" and meta["n_cases"] == len(pool)
    assert "validation cases" in (out / "oof" / "summary.md").read_text()
    assert {p.name for p in (out / "oof" / "predictions").glob("*.nii.gz")} == {f"{c}.nii.gz" for c in pool}
    pp = json.loads((out / "postprocessing.json").read_text())
    assert set(pp["chosen_on"]["cases"]) == pool  # chosen on the pooled out-of-fold cases, never the test split
    assert "no region" in pp["criterion"] and {c["region"] for c in pp["candidates"]} == {"WT", "TC", "ET"}
    ens = json.loads((out / "ensemble.json").read_text())
    assert [Path(m).parts[:2] for m in ens["members"]] == [("runs", f"fold_{k}") for k in range(3)]
    summary = (out / "summary.md").read_text()
    assert "out of fold (validation)" in summary and "test split, ensemble (test)" in summary


@pytest.mark.slow
def test_test_split_is_scored_once_as_test(cv: dict) -> None:
    test = cv["out"] / "test"
    meta = json.loads((test / "evaluation.json").read_text())
    assert meta["role"] == "test"
    assert sorted(r["case_id"] for r in pq.read_table(test / "metrics.parquet").to_pylist()
                  if r["region"] == "WT") == TEST_SUBJECTS
    assert "test split: cases no choice touched" in (test / "summary.md").read_text()
    assert not (test / "postprocessing.json").exists()  # applied there, never chosen there


@pytest.mark.slow
def test_evaluate_refuses_choices_on_the_test_split_and_leaves_runs_alone(cv: dict, tmp_path: Path) -> None:
    out, store = cv["out"], cv["store"]
    refused = run_cmd([PYTHON, "launch/evaluate.py", "--model", str(out), "--store", str(store), "--split", "test",
                       "--choose-postprocessing", "--output", str(tmp_path / "refused")])
    assert refused.returncode == 2 and "refused" in refused.stdout and not (tmp_path / "refused").exists()
    run = out / "runs" / "fold_1"
    before = _tree(run)
    res = run_cmd([PYTHON, "launch/evaluate.py", "--model", str(run), "--store", str(store), "--output",
                   str(tmp_path / "val"), "--choose-postprocessing"])
    ok(res)
    assert (tmp_path / "val" / "postprocessing.json").is_file()
    after = {k: v for k, v in _tree(run).items() if not k.startswith("tb/")}  # TensorBoard gets the evaluation
    assert after == {k: v for k, v in before.items() if not k.startswith("tb/")}  # nothing else written there
    assert json.loads((tmp_path / "val" / "evaluation.json").read_text())["role"] == "validation"


@pytest.mark.slow
def test_evaluate_refuses_to_score_a_model_on_cases_it_trained_on(cv: dict, tmp_path: Path) -> None:
    """The fold ensemble held out no fold (each member trained on the others'); fold 1's model trained on fold 0.
    Neither may produce a "validation" number there: out of fold is the CV folder's oof/, unbiased is the test
    split."""
    evaluate = [PYTHON, "launch/evaluate.py", "--store", str(cv["store"]), "--output", str(tmp_path / "e")]
    res = run_cmd([*evaluate, "--model", str(cv["out"])])
    assert res.returncode == 2 and "no fold is held out by every member" in res.stdout, res.stdout[-2000:]
    res = run_cmd([*evaluate, "--model", str(cv["out"] / "runs" / "fold_1"), "--fold", "0"])
    assert res.returncode == 2 and "--fold 0:" in res.stdout and "trained on it" in res.stdout, res.stdout[-2000:]
    assert not (tmp_path / "e" / "metrics.parquet").exists()


@pytest.mark.slow
def test_a_store_whose_assignment_changed_after_the_folds_trained_is_refused(cv: dict, tmp_path: Path) -> None:
    """The store is re-preprocessed in place with a training case moved into the test split: finishing the CV
    would score that case as "test" with the fold models that trained on it."""
    store, folder = tmp_path / "b.zarr", tmp_path / "cv"
    shutil.copytree(cv["store"], store)
    shutil.copytree(cv["out"], folder, ignore=shutil.ignore_patterns("oof", "test"))
    plan = json.loads((folder / "crossval.json").read_text())
    plan.update(store=str(store), config_sha256="",  # as if this CV had been made on this store
                overrides=[f"data.store={store}" if o.startswith("data.store=") else o for o in plan["overrides"]])
    (folder / "crossval.json").write_text(json.dumps(plan))
    moved = Store.open(store).case_ids(folds=[1], labelled_only=True)[0]
    ok(run_cmd([PYTHON, "-m", "preprocess", "brats", "--src", str(cv["root"] / "raw"), "--dst", str(tmp_path),
                "--name", "b", "--serial", "--folds", "3", "--fold-assignment", "balanced", "--test-subjects",
                ",".join([*TEST_SUBJECTS, moved])]))
    assert moved in Store.open(store).case_ids(split="test")
    res = run_cmd([PYTHON, "launch/crossval.py", "--config", TRAIN[0], "--output", str(folder), "--skip-train",
                   "--test", f"data.store={store}", *TRAIN[1:]])
    assert res.returncode == 2, res.stdout[-3000:]
    # (balanced assignment moved other subjects between folds as well: the first fold found is named)
    assert "now puts in" in res.stdout and "in-sample" in res.stdout
    assert not (folder / "oof").exists()


def test_a_config_edited_in_place_is_another_experiment(cv: dict, tmp_path: Path) -> None:
    from distseg.evaluation.crossval import CrossvalError, CrossvalPlan

    config = tmp_path / "mine.yaml"
    config.write_text(Path(TRAIN[0]).read_text())
    overrides = [f"data.store={cv['store']}"]
    CrossvalPlan.create(config, overrides, output=tmp_path / "cv").save()
    CrossvalPlan.create(config, overrides, output=tmp_path / "cv")  # the same experiment: fine
    config.write_text(config.read_text().replace("lr:", "lr: 0.5 #"))
    with pytest.raises(CrossvalError, match="the resolved config"):
        CrossvalPlan.create(config, overrides, output=tmp_path / "cv")


@pytest.mark.slow
def test_the_cv_folder_is_a_model_for_predict(cv: dict, tmp_path: Path) -> None:
    raw = cv["root"] / "raw" / TEST_SUBJECTS[0]
    res = run_cmd([PYTHON, "launch/predict.py", "--model", str(cv["out"]), "--input", str(raw), "--output",
                   str(tmp_path / "pred"), "--postprocess"])
    assert "ensemble of 3" in ok(res)
    assert (tmp_path / "pred" / f"{TEST_SUBJECTS[0]}.nii.gz").is_file()


@pytest.mark.slow
def test_a_case_that_fails_is_a_counted_row(cv: dict, tmp_path: Path) -> None:
    """A damaged case (a chunk file gone) fails to predict: a failed row, the others scored, exit 3. Evaluated
    again into the same folder, the probabilities its earlier, healthy run left are not used for the choice."""
    store = tmp_path / "b.zarr"
    shutil.copytree(cv["store"], store)
    victim = Store.open(store).case_ids(folds=[1], labelled_only=True)[0]
    evaluate = [PYTHON, "launch/evaluate.py", "--model", str(cv["out"] / "runs" / "fold_1"), "--store", str(store),
                "--output", str(tmp_path / "eval"), "--choose-postprocessing"]
    ok(run_cmd(evaluate))
    assert (tmp_path / "eval" / "probabilities" / f"{victim}.npz").is_file()
    chunk = sorted((store / "cases" / victim / "image").glob("c.*"))[0]
    chunk.unlink()
    res = run_cmd(evaluate)
    assert res.returncode == 3, res.stdout[-3000:]
    assert not (tmp_path / "eval" / "probabilities" / f"{victim}.npz").exists()
    rows = pq.read_table(tmp_path / "eval" / "metrics.parquet").to_pylist()
    failed = [r for r in rows if r["status"] == "failed"]
    assert {r["case_id"] for r in failed} == {victim} and chunk.name in failed[0]["error"]
    assert all(r["dice"] == 0 for r in failed)  # counted at the worst value, not left out
    assert any(r["status"] == "ok" for r in rows)


@pytest.mark.slow
def test_choose_refuses_out_of_fold_probabilities_of_other_checkpoints(cv: dict, tmp_path: Path) -> None:
    """A fold retrained after its CV finished: the cached out-of-fold probabilities are another model's. `finish`
    records which checkpoints made them (oof/models.json); here the record says fold 1 had another one."""
    other = tmp_path / "other_cv"
    shutil.copytree(cv["out"], other)
    stamp = json.loads((other / "oof" / "models.json").read_text())
    assert set(stamp) == {"0", "1", "2"} and stamp["1"]["checkpoint"].startswith("runs/fold_1/checkpoints/step_")
    stamp["1"]["time"] -= 1.0  # the checkpoint that predicted fold 1 was an earlier one
    (other / "oof" / "models.json").write_text(json.dumps(stamp))
    res = run_cmd([PYTHON, "launch/crossval.py", "choose", str(cv["out"]), str(other), "--output",
                   str(tmp_path / "chosen")])
    assert res.returncode == 2 and "fold(s) ['1'] were predicted by other checkpoints" in res.stdout, res.stdout[-2000:]


@pytest.mark.slow
def test_choose_configuration_on_out_of_fold_predictions(cv: dict, tmp_path: Path) -> None:
    """Two configurations: the CV folder and a copy whose out-of-fold probabilities are all zero (a useless model).
    The choice is made on out-of-fold Dice only: the good one alone beats the copy and the ensemble of both."""
    import numpy as np

    bad = tmp_path / "bad_cv"
    shutil.copytree(cv["out"], bad)
    for f in (bad / "oof" / "probabilities").glob("*.npz"):
        with np.load(f) as z:
            zeros = np.zeros_like(z["probabilities"])
        np.savez_compressed(f, probabilities=zeros)
    res = ok(run_cmd([PYTHON, "launch/crossval.py", "choose", str(cv["out"]), str(bad), "--output",
                      str(tmp_path / "chosen")]))
    choice = json.loads((tmp_path / "chosen" / "choice.json").read_text())
    assert choice["winner"] == [cv["out"].name] and f"chosen: {cv['out'].name}" in res
    assert set(choice["scores"]) == {cv["out"].name, "bad_cv", f"{cv['out'].name} + bad_cv"}
    assert choice["scores"]["bad_cv"]["mean"] < choice["scores"][cv["out"].name]["mean"]
    members = json.loads((tmp_path / "chosen" / "ensemble.json").read_text())["members"]
    assert len(members) == 3 and all(str(cv["out"]) in m for m in members)
    assert (tmp_path / "chosen" / "postprocessing.json").is_file()
