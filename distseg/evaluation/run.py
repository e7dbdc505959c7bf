"""`evaluate_arrays`: score a stream of cases (in this process or a process pool) and write every output."""

from __future__ import annotations

import logging
import multiprocessing
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from distseg.evaluation.meta import EvaluationMeta
from distseg.evaluation.report import EvaluationResult, write_evaluation
from distseg.evaluation.scoring import CaseItem, score_item

log = logging.getLogger(__name__)


def evaluate_arrays(cases: Iterable[CaseItem], out_dir: str | Path, meta: EvaluationMeta, workers: int = 1,
                    total: int | None = None) -> EvaluationResult:
    """Score every case and write the outputs to `out_dir` (see `distseg.evaluation.report`).

    cases: `ScoredCase` (bool (K, *S) pred/gt masks + spacing + subject), `CaseFailure`s, or zero-argument
    loaders returning either (with `workers` > 1 they run in the worker processes, so loading is parallel too;
    they must then be picklable, e.g. module-level classes). Consumed lazily: at most 2 x `workers` cases are in
    flight, so a generator of large volumes stays bounded in memory. Region names, empty-set conventions and the
    HD95 penalty come from `meta` (and the BraTS 2023 lesion-wise metrics for brats3d, `meta.lesion_wise`). A bad
    case becomes failed rows (worst value of every metric, counted in the means); it never stops the others. Only
    the rows are kept (a few hundred bytes per case and region), never the masks: memory does not grow with the
    number of cases.
    """
    meta.validate()
    if workers < 1:
        raise ValueError(f"workers: expected an integer >= 1, got {workers!r}")
    score = partial(score_item, region_names=list(meta.regions), empty_value=meta.empty_value,
                    one_empty_hd95=meta.hd95_one_empty, lesion_wise_metrics=meta.with_lesion_wise)
    rows: list[dict[str, Any]] = []
    with tqdm(total=total, desc="evaluate", unit="case", dynamic_ncols=True) as bar:
        if workers == 1:
            for item in cases:
                rows += score(item)
                bar.update()
        else:
            # spawn, not fork: the parent has torch (and its thread pools) loaded, which fork does not copy safely.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                pending: deque[Future] = deque()
                for item in cases:
                    pending.append(pool.submit(score, item))
                    while len(pending) >= 2 * workers:
                        rows += pending.popleft().result()
                        bar.update()
                while pending:
                    rows += pending.popleft().result()
                    bar.update()
    return write_evaluation(rows, out_dir, meta)
