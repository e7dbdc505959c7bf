"""Ensembles: several trained models used as one (`ModelSet`), e.g. the fold models of a cross-validation folder.

    models = load_models(["outputs/cv/brats_budget_cv"])        # a CV folder: its fold models + its postprocessing
    models = load_models(["runs/a", "runs/b"])                  # explicit members (no shared postprocessing)
    predictor = Predictor(models, overlap=0.5)                  # probabilities averaged over the members

A folder is an ensemble when it holds `ensemble.json` (written by `launch/crossval.py`): its members (run folders
or checkpoint tags, relative to the folder) and, beside it, the `postprocessing.json` chosen on the pooled
out-of-fold predictions. Members must share the data contract (kind, channels, target, regions); those that also
share the window, mode and resolution are averaged window by window.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distseg.core.fileio import atomic_write
from distseg.inference.loading import LoadedModel, ModelIO, ModelLoadError, load_model, read_postprocessing
from distseg.inference.postprocess import Postprocessing

ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_FORMAT = "distseg-ensemble/1"


@dataclass
class ModelSet:
    """One model or an ensemble; `Predictor` takes either."""

    members: list[LoadedModel]
    postprocessing: Postprocessing | None = None
    """The rule chosen for this model or ensemble on validation (out-of-fold) predictions, if any."""
    source: str = ""

    def __post_init__(self) -> None:
        if not self.members:
            raise ModelLoadError(f"{self.source}: an ensemble needs at least one member")
        first = self.members[0].io
        for m in self.members[1:]:
            diff = [k for k in ("kind", "channels", "target", "regions") if getattr(m.io, k) != getattr(first, k)]
            if diff:
                raise ModelLoadError(
                    f"{m.source}: its {', '.join(diff)} differ from {self.members[0].source} "
                    f"({', '.join(f'{k}={getattr(m.io, k)!r} vs {getattr(first, k)!r}' for k in diff)}); "
                    "expected ensemble members trained on the same kind of data and targets")

    @property
    def io(self) -> ModelIO:
        return self.members[0].io

    def shares_window(self) -> bool:
        """True when every member runs the same window, mode and resolution (window-by-window averaging)."""
        first = self.members[0].io
        return all((m.io.mode, list(m.io.patch_size), m.io.downsample) ==
                   (first.mode, list(first.patch_size), first.downsample) for m in self.members)

    def describe(self) -> str:
        if len(self.members) == 1:
            return self.members[0].source
        return f"ensemble of {len(self.members)} ({self.source or ', '.join(m.source for m in self.members)})"


def is_ensemble_folder(path: Path) -> bool:
    return (path / ENSEMBLE_FILE).is_file()


def write_ensemble(folder: Path, members: Sequence[Path], note: dict[str, Any] | None = None) -> Path:
    """Write `folder/ensemble.json` naming `members` (stored relative to `folder` when inside it, so the folder can
    be moved or copied as a whole)."""
    rel = []
    for m in members:
        m = Path(m).resolve()
        try:
            rel.append(str(m.relative_to(folder.resolve())))
        except ValueError:
            rel.append(str(m))
    doc = {"format": ENSEMBLE_FORMAT, "members": rel, **(note or {})}
    text = json.dumps(doc, indent=1)
    return atomic_write(folder / ENSEMBLE_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def ensemble_members(folder: Path) -> list[Path]:
    """The member paths an ensemble folder names (absolute)."""
    f = folder / ENSEMBLE_FILE
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
        members = doc["members"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{f}: unreadable ensemble ({e}); expected the file launch/crossval.py writes") from e
    if doc.get("format") != ENSEMBLE_FORMAT or not isinstance(members, list) or not members:
        raise ModelLoadError(f"{f}: expected format {ENSEMBLE_FORMAT!r} with a non-empty 'members' list")
    return [(folder / m) if not Path(m).is_absolute() else Path(m) for m in members]


def load_models(paths: Sequence[str | Path], device: torch.device | str = "cpu") -> ModelSet:
    """One path (a model, or an ensemble folder with its postprocessing) or several (an ensemble without one); each
    may be an ``s3://`` URL (`distseg.inference.remote`)."""
    from distseg.inference.remote import localize  # s3:// models: fetched into the local cache first

    paths = [localize(p) for p in paths]
    if not paths:
        raise ModelLoadError("no model given; expected a run folder, checkpoint tag, model.pt, model.onnx or a "
                             "cross-validation folder")
    if len(paths) == 1:
        path = paths[0]
        if path.is_dir() and is_ensemble_folder(path):
            members = [load_model(m, device) for m in ensemble_members(path)]
            return ModelSet(members, read_postprocessing(path), str(path))
        model = load_model(path, device)
        return ModelSet([model], model.postprocessing, model.source)
    return ModelSet([load_model(p, device) for p in paths], None, " + ".join(str(p) for p in paths))
