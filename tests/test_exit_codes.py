"""One exit-status table (distseg.core.exit_codes) for every command: distinct codes, the README shows it, no
command returns a bare number, and the usage errors of each command come back as USAGE."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from distseg.core import exit_codes

REPO = Path(__file__).resolve().parents[1]
COMMAND_FILES = ["launch/train.py", "launch/predict.py", "launch/evaluate.py", "launch/supervise.py",
                 "launch/crossval.py", "distseg/inference/export.py", "preprocess/__main__.py",
                 "preprocess/pipeline.py", "preprocess/runner.py"]
BARE = re.compile(r"\b(?:return|sys\.exit\(|os\._exit\(|SystemExit\()\s*[1-9]\d*\b")


def test_codes_are_distinct_and_each_has_a_meaning():
    codes = [exit_codes.OK, exit_codes.ERROR, exit_codes.USAGE, exit_codes.SOME_FAILED, exit_codes.PREEMPTED,
             exit_codes.LOST_RANK, exit_codes.DIVERGED]
    assert codes == [0, 1, 2, 3, 4, 5, 6] and sorted(exit_codes.TABLE) == codes
    from distseg.train.lost_rank import EXIT_LOST_RANK
    from distseg.train.preemption import EXIT_REQUEUE

    assert (EXIT_REQUEUE, EXIT_LOST_RANK) == (exit_codes.PREEMPTED, exit_codes.LOST_RANK)


def test_the_readme_table_lists_every_code():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for code in exit_codes.TABLE:
        assert re.search(rf"^\| {code} \| \S", readme, re.M), f"README: no row for exit status {code}"


@pytest.mark.parametrize("path", COMMAND_FILES)
def test_no_command_returns_a_bare_number(path):
    text = (REPO / path).read_text(encoding="utf-8")
    bare = [line.strip() for line in text.splitlines() if BARE.search(line) and not line.lstrip().startswith("#")]
    assert not bare, f"{path}: use distseg.core.exit_codes names, not {bare}"


def test_library_mains_return_table_names():
    from distseg import config
    from distseg.core import checkpoint

    for main in (config.main, checkpoint.main):
        assert not BARE.search(inspect.getsource(main)), main.__module__


def test_usage_errors_are_usage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from distseg.config import main as config_main
    from distseg.inference.export import main as export_main
    from launch.evaluate import main as evaluate_main
    from launch.predict import main as predict_main
    from launch.train import main as train_main

    assert train_main(["--config", "no_such_config"]) == exit_codes.USAGE
    assert predict_main(["--model", str(tmp_path / "none"), "--input", str(tmp_path), "--output",
                         str(tmp_path / "out")]) == exit_codes.USAGE
    assert evaluate_main(["--pred", str(tmp_path / "p"), "--output", str(tmp_path / "o")]) == exit_codes.USAGE
    assert export_main([str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == exit_codes.USAGE
    assert config_main(["check", "no_such_config"]) == exit_codes.USAGE
    assert config_main(["check", "debug"]) == exit_codes.OK
