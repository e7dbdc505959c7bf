"""Choose among configurations on their out-of-fold predictions (nnU-Net's `find_best_configuration`): each CV
folder alone, and the ensembles of two or more of them, are scored on the pooled out-of-fold probabilities of the
same cases; the best mean Dice wins, its postprocessing is chosen on its own out-of-fold predictions, and the
output folder becomes a model (`ensemble.json` + `postprocessing.json`) for `launch/predict.py --model DIR`.

    result = choose_configuration([cv_a, cv_b], out_dir)
    result.winner        # e.g. ("brats_budget_cv", "brats_small_cv")

The test split plays no part: only out-of-fold cases (the CV folders' pools) are read.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from distseg.core.fileio import atomic_write
from distseg.data.store import Store
from distseg.evaluation.crossval import (
    CrossvalError,
    CrossvalPlan,
    check_oof_models,
    fold_models,
    out_of_fold_cases,
)
from distseg.evaluation.postprocessing import (
    PROBABILITIES_DIR,
    ProbabilityCache,
    SubjectDice,
    case_subject,
    choose_postprocessing,
    store_truth,
)
from distseg.evaluation.postprocessing import write_postprocessing as write_pp
from distseg.inference.ensemble import write_ensemble
from distseg.inference.loading import POSTPROCESSING_FILE, load_model
from distseg.inference.postprocess import clip_to_containers

logger = logging.getLogger(__name__)

CHOICE_FILE = "choice.json"


@dataclass
class ConfigurationChoice:
    winner: tuple[str, ...]
    """Names (CV folder names) of the chosen configuration or ensemble."""
    scores: dict[str, dict[str, float]]
    """{candidate: {region: mean out-of-fold Dice per subject, "mean": ...}} for every candidate."""
    folder: Path


def _name(path: Path) -> str:
    return Path(path).name


def choose_configuration(cv_dirs: Sequence[Path], out_dir: Path, max_members: int | None = None
                         ) -> ConfigurationChoice:
    """Score every CV folder and every ensemble of 2..`max_members` of them on the shared out-of-fold cases; write
    the winner as a model folder (`out_dir`): ensemble.json (its fold models), postprocessing.json, choice.json."""
    plans = [CrossvalPlan.load(Path(d)) for d in cv_dirs]
    names = [_name(Path(p.folder)) for p in plans]
    if len(set(names)) != len(names):
        raise CrossvalError(f"CV folders need distinct names to be told apart: {names}")
    stores = {p.store for p in plans}
    if len(stores) != 1:
        raise CrossvalError(f"the CV folders were run on different stores {sorted(stores)}; expected one store (the "
                            "same pool cases)")
    store = Store.open(plans[0].store)
    case_sets = [{c for cases in out_of_fold_cases(p, store).values() for c in cases} for p in plans]
    cases = sorted(set.intersection(*case_sets))
    if any(s != set(cases) for s in case_sets):
        raise CrossvalError("the CV folders predicted different out-of-fold cases (other folds?); expected the same "
                            "pool")
    for p in plans:
        check_oof_models(p)
    caches = [ProbabilityCache(Path(p.folder) / "oof" / PROBABILITIES_DIR) for p in plans]
    missing = [n for n, c in zip(names, caches, strict=True) if not all(c.has(cid) for cid in cases)]
    if missing:
        raise CrossvalError(f"{missing}: out-of-fold probabilities missing; run launch/crossval.py on them first")
    first = load_model(next(iter(fold_models(plans[0]).values())))
    regions = first.io.decode_regions
    top = len(plans) if max_members is None else max(1, min(max_members, len(plans)))
    candidates = [c for k in range(1, top + 1) for c in itertools.combinations(range(len(plans)), k)]
    scored = SubjectDice(len(candidates), len(regions))  # per subject: a patient's slices stacked
    truth = store_truth(store)
    for cid in tqdm(cases, desc="configurations", unit="case", dynamic_ncols=True):
        label, attrs = truth.label(cid), truth.attrs(cid)
        gt = np.stack([np.isin(label, vals) for vals in regions.values()])
        probs = [c.get(cid) for c in caches]
        for i, members in enumerate(candidates):
            mean = sum(probs[m] for m in members) / len(members)
            scored.add(i, case_subject(cid, attrs), clip_to_containers(mean > 0.5, regions), gt)
    means = scored.means()
    scores: dict[str, dict[str, float]] = {}
    for members, row in zip(candidates, means, strict=True):
        key = " + ".join(names[m] for m in members)
        scores[key] = {**{r: float(v) for r, v in zip(regions, row, strict=True)}, "mean": float(row.mean())}
    # Best mean Dice; on a tie the smaller candidate (fewer members: cheaper to run) wins.
    best = max(range(len(candidates)), key=lambda i: (round(float(means[i].mean()), 9), -len(candidates[i])))
    winner = candidates[best]
    logger.info("out-of-fold mean Dice: %s; chosen: %s", {k: round(v["mean"], 4) for k, v in scores.items()},
                " + ".join(names[m] for m in winner))
    out_dir.mkdir(parents=True, exist_ok=True)
    win_cache = caches[winner[0]]
    if len(winner) > 1:  # the ensemble's own out-of-fold probabilities, for its postprocessing
        win_cache = ProbabilityCache(out_dir / "oof" / PROBABILITIES_DIR)
        for cid in cases:
            win_cache.put(cid, sum(caches[m].get(cid) for m in winner) / len(winner))
    pp, table = choose_postprocessing(win_cache, truth, cases, regions)
    write_pp(out_dir / POSTPROCESSING_FILE, pp, table,
             {"store": plans[0].store, "cases": cases, "model": " + ".join(names[m] for m in winner)})
    members = [t for m in winner for t in fold_models(plans[m]).values()]
    write_ensemble(out_dir, members, {"configurations": [plans[m].folder for m in winner]})
    doc: dict[str, Any] = {"winner": [names[m] for m in winner], "scores": scores, "cases": len(cases),
                           "criterion": "mean out-of-fold Dice over regions, Dice per subject (a patient's slices "
                                        "stacked; a 3D case is its own subject); ties: fewer members",
                           "subjects": scored.n_subjects,
                           "cv_folders": [p.folder for p in plans]}
    text = json.dumps(doc, indent=1)
    atomic_write(out_dir / CHOICE_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return ConfigurationChoice(tuple(names[m] for m in winner), scores, out_dir)
