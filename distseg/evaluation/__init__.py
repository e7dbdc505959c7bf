"""Evaluation: predictions vs ground truth per case and region, the BraTS/seed metric set, tables, plots, compare.

Arrays in, files out; never imports `preprocess` or `ray` (`launch/evaluate.py` finds and reads the files):

    masks = region_masks(label, "brats2018")                       # bool (K, *S): WT, TC, ET
    rows = evaluate_case(pred_masks, gt_masks, spacing_mm, ["WT", "TC", "ET"], case_id="c1")
    lesion_wise(pred_masks[0], gt_masks[0], spacing_mm).dice             # BraTS 2023 lesion-wise, one region
    result = evaluate_arrays(cases, out_dir, EvaluationMeta(kind="brats3d", regions=["WT", "TC", "ET"]))
    print(compare([eval_dir_a, eval_dir_b]))

Modules: `scoring` (region masks, per-case rows, failed rows, per-subject stacking), `lesionwise` (BraTS 2023
lesion-wise Dice/HD95), `report` (tables, summary, box plots, evaluation.json, TensorBoard), `run`
(`evaluate_arrays`), `compare` (side-by-side Markdown tables). Every case counts: a failed or missing case is a row
per region with the worst value of every metric, included in the means.
"""

from distseg.evaluation.compare import compare
from distseg.evaluation.lesionwise import LESION_HD95_PENALTY, LesionWiseResult, lesion_wise
from distseg.evaluation.meta import (
    EvaluationMeta,
    ModelInfo,
    conventions_text,
    read_evaluation_meta,
    write_evaluation_meta,
)
from distseg.evaluation.report import (
    EvaluationResult,
    log_evaluation,
    read_table,
    summarise,
    write_evaluation,
)
from distseg.evaluation.run import evaluate_arrays
from distseg.evaluation.scoring import (
    BRATS_HD95_ONE_EMPTY,
    LESION_METRICS,
    METRICS,
    CaseFailure,
    ScoredCase,
    default_regions,
    evaluate_case,
    infer_brats_convention,
    region_masks,
    subject_metrics,
)

__all__ = [
    "BRATS_HD95_ONE_EMPTY", "LESION_HD95_PENALTY", "LESION_METRICS", "METRICS", "ScoredCase", "CaseFailure",
    "EvaluationMeta", "EvaluationResult", "LesionWiseResult", "ModelInfo", "compare", "conventions_text",
    "default_regions", "evaluate_arrays", "evaluate_case", "infer_brats_convention", "lesion_wise", "log_evaluation",
    "read_evaluation_meta", "read_table", "region_masks", "summarise", "subject_metrics", "write_evaluation",
    "write_evaluation_meta",
]
