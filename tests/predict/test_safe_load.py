"""Files from elsewhere (a shared bucket, another team's run or store) cannot run code or write outside the output:
DeepSpeed's checkpoint files are read without running pickled code (`distseg.core.safe_load`), output files named
after case ids stay in their folder (`distseg.core.fileio.inside`)."""

from __future__ import annotations

import json
import pathlib
import shutil
from pathlib import Path

import pytest
import torch

from distseg.core.checkpoint import MARKER
from distseg.core.safe_load import TRUST_ENV, UnsafeCheckpointError, weights_only_loads
from distseg.inference.loading import ModelLoadError, load_model

pytestmark = pytest.mark.slow


class _Touch:
    """Unpickling this creates `path`: stands for any code a crafted checkpoint file could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def _plant(tag: Path, name: str, payload: object) -> None:
    """Replace checkpoint file `name` of `tag` by `payload` and record its new size in the marker (the tag still
    looks complete, as a tampered bucket copy would)."""
    torch.save(payload, tag / name)
    marker = json.loads((tag / MARKER).read_text())
    marker["files"][name] = (tag / name).stat().st_size
    (tag / MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_a_checkpoint_with_a_crafted_pickle_is_refused_and_runs_nothing(stage, request, tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    run = tmp_path / "run"
    shutil.copytree(request.getfixturevalue("brats_run" if stage == "zero2" else "brats_run_zero3"), run)
    assert load_model(run).module is not None  # the untouched copy loads under the same restrictions
    tag = sorted((run / "checkpoints").glob("step_*"))[-1]
    shard = sorted(tag.glob("*optim_states.pt"))[0]
    state = torch.load(shard, map_location="cpu", weights_only=False)  # the test's own file: trusted here
    sentinel = tmp_path / "ran"
    state["evil"] = _Touch(sentinel)
    _plant(tag, shard.name, state)
    with pytest.raises(ModelLoadError) as err:  # predict/evaluate/export: exit 2 with this message
        load_model(run)
    assert not sentinel.exists()
    assert str(tag) in str(err.value) and "global getattr" in str(err.value) and TRUST_ENV in str(err.value)


def test_the_restriction_ends_with_its_block(tmp_path, monkeypatch):
    """Outside `weights_only_loads` torch.load is the caller's business again (the process's setting restored)."""
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    path = tmp_path / "x.pt"
    sentinel = tmp_path / "ran"
    torch.save({"a": _Touch(sentinel)}, path)
    with pytest.raises(UnsafeCheckpointError), weights_only_loads(str(path)):
        torch.load(path, weights_only=False)  # DeepSpeed's style of call: forced to the restricted unpickler
    assert not sentinel.exists()
    torch.load(path, weights_only=False)
    assert sentinel.exists()


@pytest.mark.parametrize("case_id", ["../x", "/tmp/abs", "a/b", "bad\nname", "../../etc/cron.d/x"])
def test_output_files_named_after_a_case_stay_in_their_folder(case_id, tmp_path):
    """Writers that name files after case ids (probability caches, predictions) refuse ids that are not one plain
    file name; a plain name with spaces (a raw file's stem) is fine."""
    import numpy as np

    from distseg.evaluation.postprocessing import ProbabilityCache

    cache = ProbabilityCache(tmp_path / "probabilities")
    with pytest.raises(ValueError, match="not a plain file name"):
        cache.put(case_id, np.zeros((1, 2, 2, 2), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["probabilities"])
    assert not (tmp_path / "probabilities").exists() or not any((tmp_path / "probabilities").iterdir())
    cache.put("patient 1_slice_3", np.ones((1, 2, 2, 2), np.float32))
    assert cache.get("patient 1_slice_3").sum() == 8
