"""The cross-validation plan and its fold trainings: `crossval.json` (config, its digest, overrides, store, folds),
the fold runs launched one after another with the real launcher, and the checks that each finished fold model is
usable out of fold (trained to completion; trained on no case the store now puts in its fold or the test split).
`distseg.evaluation.crossval` does the out-of-fold prediction and the choices."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distseg.config import ExperimentConfig, dump_yaml, load_config
from distseg.config_files import resolve_config
from distseg.core.exit_codes import OK, PREEMPTED
from distseg.core.fileio import atomic_write
from distseg.data.store import Store
from distseg.inference.loading import resolve_checkpoint

logger = logging.getLogger(__name__)

PLAN_FILE = "crossval.json"
PLAN_FORMAT = "distseg-crossval/1"


class CrossvalError(Exception):
    """A cross-validation cannot run as asked (the message names the file, fold or key and what was expected)."""


@dataclass
class CrossvalPlan:
    """What a CV folder is: saved as crossval.json, so reruns, job-array tasks and the finishing step agree."""

    folder: str
    config: str
    """The experiment YAML every fold trains (with `overrides`)."""
    overrides: list[str]
    store: str
    folds: list[int]
    """The folds run here; every fold of the store (its ``folds`` root attr) unless a subset was asked for."""
    n_folds: int
    """K of the store's fold assignment."""
    config_sha256: str = ""
    """Digest of the resolved experiment config (file content + overrides): editing the YAML in place between
    reruns is refused like another config path ("" in plans written before it was recorded)."""
    status: dict[str, str] = field(default_factory=dict)
    """{fold: "done" | "pending"} as last seen (informational: `fold_done` decides from the fold's own run, so
    job-array tasks training different folds at once never race on this file)."""
    format: str = PLAN_FORMAT

    @property
    def path(self) -> Path:
        return Path(self.folder)

    def run_dir(self, fold: int) -> Path:
        return self.path / "runs" / f"fold_{fold}"

    def fold_overrides(self, fold: int) -> list[str]:
        """The fold's training overrides: the user's, then the fold's validation fold and run folder (last: win)."""
        return [*self.overrides, f"data.val_folds=[{fold}]", f"run.output_root={self.path}", f"run.name=fold_{fold}"]

    def save(self) -> None:
        self.status = {str(k): "done" if fold_done(self, k) else "pending" for k in range(self.n_folds)
                       if str(k) in self.status or k in self.folds}
        text = json.dumps(asdict(self), indent=1)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / PLAN_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, folder: Path) -> CrossvalPlan:
        f = Path(folder) / PLAN_FILE
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
            if doc.get("format") != PLAN_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {PLAN_FORMAT!r}")
            doc["folder"] = str(Path(folder).resolve())  # where it is now: a CV folder may be moved or copied
            return cls(**doc)
        except (OSError, ValueError, TypeError) as e:
            raise CrossvalError(f"{f}: unreadable cross-validation plan ({e}); expected the file "
                                "launch/crossval.py writes") from e

    @classmethod
    def create(cls, config: str | Path, overrides: Sequence[str], folds: Sequence[int] | None = None,
               output: str | Path | None = None) -> CrossvalPlan:
        """The plan for `config` + `overrides`, merged with an existing crossval.json in the same folder (which
        must have the same config, overrides and store: a CV folder is one experiment)."""
        config = resolve_config(config)  # a path, or the name of a shipped config
        cfg = load_config(config, list(overrides))
        store = Store.open(cfg.data.store)
        n_folds = int(store.attrs.get("folds", 0))
        if n_folds < 2:
            raise CrossvalError(f"{store.path}: root attr folds={n_folds}; expected a store preprocessed with "
                                "--folds K >= 2")
        chosen = sorted(set(folds)) if folds else list(range(n_folds))
        bad = [k for k in chosen if not 0 <= k < n_folds]
        if bad:
            raise CrossvalError(f"--folds {bad}: the store {store.path} has folds 0..{n_folds - 1}")
        for k in chosen:
            if not store.case_ids(folds=[k], labelled_only=True):
                raise CrossvalError(f"{store.path}: fold {k} has no labelled training-pool case; expected every "
                                    "fold to hold cases (fewer folds at preprocessing, or --fold-assignment balanced)")
        folder = Path(output) if output else Path(cfg.run.output_root) / "crossval" / cfg.run.name
        digest = hashlib.sha256(dump_yaml(cfg).encode("utf-8")).hexdigest()
        plan = cls(str(folder.expanduser().resolve()), str(Path(config).resolve()), list(overrides),
                   str(store.path), chosen, n_folds, config_sha256=digest)
        if (plan.path / PLAN_FILE).is_file():
            old = cls.load(plan.path)
            keys = ("config", "overrides", "store", "n_folds", *(("config_sha256",) if old.config_sha256 else ()))
            for key in keys:
                if getattr(old, key) != getattr(plan, key):
                    what = ("the resolved config (the YAML file was edited since)" if key == "config_sha256"
                            else f"{key}={getattr(old, key)!r}, not {getattr(plan, key)!r}")
                    raise CrossvalError(f"{plan.path / PLAN_FILE}: this CV folder was made with {what}; use another "
                                        "--output (one folder = one experiment)")
            plan.status = old.status
        return plan


def fold_config(plan: CrossvalPlan, fold: int) -> ExperimentConfig:
    return load_config(plan.config, plan.fold_overrides(fold))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launcher_command(launcher: Sequence[str], train_script: Path, plan: CrossvalPlan, fold: int) -> list[str]:
    """`launcher` (e.g. ``deepspeed --num_gpus 2``) + the training script + the fold's config and overrides. A
    local `deepspeed` launcher without ``--master_port`` gets a free loopback port, so folds never collide."""
    cmd = list(launcher)
    local = any(Path(c).name == "deepspeed" for c in cmd) and "--hostfile" not in cmd
    if local and "--master_port" not in cmd:
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    return [*cmd, str(train_script), "--config", plan.config, *plan.fold_overrides(fold)]


def fold_done(plan: CrossvalPlan, fold: int) -> bool:
    """The fold's training finished: its run wrote summary.json without a stop signal, and its newest complete
    checkpoint is at the summary's step (a run killed after that would have no newer summary)."""
    from distseg.core import checkpoint

    run = plan.run_dir(fold)
    try:
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    newest = checkpoint.newest_complete(run / "checkpoints")
    return (not summary.get("stopped_on_signal") and newest is not None
            and int(newest[1].get("step", -1)) == int(summary.get("step", -2)))


def run_folds(plan: CrossvalPlan, launcher: Sequence[str], train_script: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> int:
    """Train every pending fold of `plan`, one after another; returns 0, or the first failing launcher's status
    (4 = stopped on a signal after a checkpoint: rerun to resume). The plan is saved after every fold."""
    plan.save()
    for k in plan.folds:
        if fold_done(plan, k):
            logger.info("fold %d: done (%s), skipped", k, plan.run_dir(k))
            continue
        cmd = launcher_command(launcher, train_script, plan, k)
        logger.info("fold %d/%d: $ %s", k, plan.n_folds, " ".join(cmd))
        rc = subprocess.call(cmd, env=env, cwd=cwd)
        summary = plan.run_dir(k) / "summary.json"
        stopped = True
        if rc == 0 and summary.is_file():
            stopped = bool(json.loads(summary.read_text(encoding="utf-8")).get("stopped_on_signal"))
        plan.save()
        if rc != 0 or stopped:
            why = "" if rc != 0 else " but wrote no summary.json" if not summary.is_file() else " (stopped on a signal)"
            logger.error("fold %d: training exited %d%s; rerun the same command to resume it", k, rc, why)
            return rc or PREEMPTED
    return OK


def check_fold_cases(plan: CrossvalPlan, store: Store) -> None:
    """Every fold model's training cases (its run's cases.json, all its starts) are outside its own fold and the
    test split AS THE STORE ASSIGNS THEM NOW: re-preprocessing (another --test-subjects, more subjects moving folds
    under balanced assignment) after the folds trained would otherwise make out-of-fold and test scores
    in-sample."""
    test = set(store.case_ids(split="test"))
    for k in plan.folds:
        path = plan.run_dir(k) / "cases.json"  # distseg.train.trainer.CASES_FILE
        try:
            trained = set(json.loads(path.read_text(encoding="utf-8"))["train"])
        except (OSError, ValueError, KeyError) as e:
            raise CrossvalError(f"{path}: unreadable ({e}); expected the list of cases fold {k} trained on") from e
        held_out = set(store.case_ids(folds=[k], labelled_only=True))
        leaked = sorted(trained & (test | held_out))
        if leaked:
            where = "the test split" if set(leaked) <= test else f"fold {k}" if not set(leaked) & test else \
                f"fold {k} and the test split"
            raise CrossvalError(
                f"{plan.run_dir(k)} trained on {len(leaked)} case(s) that {store.path} now puts in {where} "
                f"({', '.join(leaked[:5])}{', ...' if len(leaked) > 5 else ''}): the store's fold or test assignment "
                "changed after this fold trained; scoring them would be in-sample. Retrain into another --output")


def fold_models(plan: CrossvalPlan) -> dict[int, Path]:
    """{fold: the checkpoint its run chose (best on its own validation fold, else the newest complete)}."""
    missing = [k for k in plan.folds if not fold_done(plan, k)]
    if missing:
        raise CrossvalError(f"{plan.path}: fold(s) {missing} not trained to completion; run launch/crossval.py "
                            "without --skip-train (or finish their job-array tasks) first")
    return {k: resolve_checkpoint(plan.run_dir(k)) for k in plan.folds}


def parse_folds(text: str) -> list[int]:
    """"0-4" / "0,2,3" / "1" -> sorted fold numbers."""
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"--folds {text!r}: expected numbers and ranges such as 0-4 or 0,2,3")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo:
            raise ValueError(f"--folds {text!r}: range {lo}-{hi} runs backwards")
        out.update(range(lo, hi + 1))
    return sorted(out)


def default_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: gloo stays on loopback
    return env


OOF_MODELS_FILE = "oof/models.json"
"""Which fold checkpoints made a CV folder's out-of-fold probabilities (written by `finish`, checked by `choose`)."""


def fold_model_stamp(plan: CrossvalPlan, tags: dict[int, Path] | None = None) -> dict[str, dict[str, object]]:
    """{fold: its chosen checkpoint (relative to the CV folder, so a copied folder matches) and the checkpoint
    marker's time}: what identifies the model that predicted that fold's cases. `tags`: `fold_models(plan)` when
    the caller has it."""
    from distseg.core import checkpoint

    stamp: dict[str, dict[str, object]] = {}
    for k, tag in (tags if tags is not None else fold_models(plan)).items():
        marker = checkpoint.read_marker(tag) or {}
        stamp[str(k)] = {"checkpoint": str(tag.relative_to(plan.path)) if tag.is_relative_to(plan.path) else str(tag),
                         "time": marker.get("time")}
    return stamp


def check_oof_models(plan: CrossvalPlan) -> None:
    """The folder's cached out-of-fold probabilities come from its fold models as they are now (a fold retrained
    after `finish` would otherwise be chosen on another model's predictions)."""
    path = plan.path / OOF_MODELS_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        logger.warning("%s: no record of the checkpoints that made its out-of-fold probabilities (a CV folder from "
                       "before it was kept); trusting them", plan.path)
        return
    except (OSError, ValueError) as e:
        raise CrossvalError(f"{path}: unreadable ({e})") from e
    now = fold_model_stamp(plan)
    if saved != now:
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise CrossvalError(f"{plan.path}: the out-of-fold probabilities of fold(s) {changed} were predicted by "
                            "other checkpoints than the fold models it holds now (retrained?); rerun "
                            f"`launch/crossval.py --skip-train --output {plan.path} ...` first")
