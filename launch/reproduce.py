"""Reproduce the results tables on the shared real data (`make reproduce`): a test split no choice touches,
cross-validation on the rest, the fold ensemble and the single budget model, each scored on the test split.

    python -m launch.reproduce [--data ../shared/data] [--out reproduce_out] [--only brats,lgg] [--ranks 2]
                               [--brats-cv brats_budget_cv[,brats_budget_cv_intensity]] [--skip-single] [--skip-cv]
                               [key=value ...]

Each stage runs the product's own command in a subprocess, as a user types it:
1. `python -m preprocess brats|images2d ... --test-subjects ...`: BraTS: the three cases from institutions other
   than CBICA (Brats18_2013_3_1, Brats18_TCIA01_201_1, BraTS2021_00006: the only cross-institution check the
   shared data offers) are the test split; the 16 CBICA cases are the pool, 3 balanced folds. LGG: the patients of
   institutions CS and EZ are the test split; the others (DU, FG, HT) the pool, 3 balanced folds.
2. `python launch/crossval.py --config configs/<x>_budget_cv*.yaml` per configuration (BraTS: `--brats-cv`, by
   default brats_budget_cv only; LGG: lgg_budget_cv): folds, out-of-fold predictions (the validation numbers),
   postprocessing chosen on them; given several configurations, `launch/crossval.py choose` keeps the configuration
   or ensemble with the best out-of-fold Dice; only that one is scored on the test split (`launch/evaluate.py
   --split test --postprocess`).
3. the single budget model (`configs/brats_budget.yaml`, `configs/lgg_budget_res_inception_unet.yaml`) trained by
   `deepspeed launch/train.py` on the pool with fold 0 as its validation fold (its "best" checkpoint and its
   postprocessing are chosen there: `launch/evaluate.py --choose-postprocessing`), then scored on the test split
   with that postprocessing (`launch/evaluate.py --split test --postprocess FILE`).
4. `<out>/results.md`: validation and test numbers side by side, labelled, with the hardware, commands and times.
Extra `key=value` arguments go to every training run (e.g. `train.max_minutes=2` for a quick pass). Wall time on 2
cores: 81 min, measured from a clean clone on 2026-12-07 (BraTS 3 x 6.5 min CV + 25 min single, LGG 3 x 6 min CV +
8 min single, out-of-fold and test prediction, preprocessing); each extra BraTS CV configuration adds ~25 min.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("launch.reproduce")
REPO = Path(__file__).resolve().parents[1]

BRATS_SOURCES = ("brats2018", "brats2021")
BRATS_TEST = ("Brats18_2013_3_1", "Brats18_TCIA01_201_1", "BraTS2021_00006")
LGG_SOURCE = "seg2d/lgg-kaggle3m"
LGG_TEST_INSTITUTIONS = ("CS", "EZ")
FOLDS = 3


def _run(cmd: list[str], env: dict[str, str], log: Path, ok_codes: tuple[int, ...] = (0,)) -> int:
    logger.info("$ %s   (log: %s)", " ".join(cmd), log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if rc not in ok_codes:
        raise SystemExit(f"reproduce: step failed with exit status {rc}: {' '.join(cmd)} (see {log})")
    return rc


def _deepspeed() -> str:
    beside = Path(sys.executable).with_name("deepspeed")
    return str(beside) if beside.exists() else "deepspeed"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _link_cases(data: Path, out: Path) -> Path:
    """One source folder holding the BraTS case folders of every release (symlinks; nothing is copied)."""
    src = out / "raw_brats"
    src.mkdir(parents=True, exist_ok=True)
    for release in BRATS_SOURCES:
        for case in sorted((data / release).iterdir()):
            link = src / case.name
            if case.is_dir() and not link.exists():
                link.symlink_to(case.resolve(), target_is_directory=True)
    return src


def lgg_test_patients(src: Path) -> list[str]:
    """The LGG patients (folders `TCGA_<inst>_<id>_<date>`) of the test institutions."""
    return sorted(p.name for p in src.iterdir() if p.is_dir() and p.name.split("_")[1] in LGG_TEST_INSTITUTIONS)


def _hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def _summary(eval_dir: Path) -> dict | None:
    f = eval_dir / "summary.json"
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None


def _means(summary: dict, key: str, metric: str) -> dict[str, float]:
    return {r["region"]: r["mean"] for r in summary.get(key) or [] if r["metric"] == metric}


def table(rows: list[tuple[str, str, Path]], per_subject: bool) -> list[str]:
    """Markdown rows: model | cases (role) | n | Dice per region [| per-patient Dice] | HD95 per region."""
    out: list[str] = []
    for model, label, eval_dir in rows:
        s = _summary(eval_dir)
        if s is None:
            continue
        meta = json.loads((eval_dir / "evaluation.json").read_text(encoding="utf-8"))
        dice, hd = _means(s, "cases", "dice"), _means(s, "cases", "hd95")
        if not out:
            head = ["model", "cases", "n", *(f"Dice {r}" for r in dice)]
            if per_subject:
                head.append("per-patient Dice")
            head += [f"HD95 {r}" for r in hd]
            out += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        cells = [model, f"{label} ({meta['role']})", str(meta["n_cases"]), *(f"{v:.3f}" for v in dice.values())]
        if per_subject:
            subj = _means(s, "subjects", "dice")
            cells.append(f"{next(iter(subj.values())):.3f}" if subj else "–")
        cells += [f"{v:.1f}" for v in hd.values()]
        out.append("| " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m launch.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared real data")
    p.add_argument("--out", type=Path, default=REPO / "reproduce_out")
    p.add_argument("--only", default="brats,lgg", help="which datasets: brats, lgg or both")
    p.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks per training run")
    p.add_argument("--brats-cv", default="brats_budget_cv",
                   help="BraTS CV configurations, comma-separated (several: the choice among them and their ensembles "
                        "is made on out-of-fold Dice), e.g. brats_budget_cv,brats_budget_cv_intensity")
    p.add_argument("--skip-single", action="store_true", help="no single budget model")
    p.add_argument("--skip-cv", action="store_true", help="no cross-validation")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every training run")
    args = p.parse_args(argv)
    data, out = args.data.resolve(), args.out.resolve()
    if not (data / "brats2018").is_dir():
        raise SystemExit(f"reproduce: {data} does not hold the shared real data (expected brats2018/, "
                         f"{LGG_SOURCE}/); pass --data")
    env = dict(os.environ)
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    py = sys.executable
    only = set(args.only.split(","))
    logs, stores = out / "logs", out / "stores"
    timings: dict[str, float] = {}
    datasets = []
    if "brats" in only:
        datasets.append(("brats", "brats_budget", [c for c in args.brats_cv.split(",") if c],
                         stores / "brats_real.zarr", list(BRATS_TEST),
                         ["brats", "--src", str(_link_cases(data, out)), "--name", "brats_real"]))
    if "lgg" in only:
        src = data / LGG_SOURCE
        datasets.append(("lgg", "lgg_budget_res_inception_unet", ["lgg_budget_cv"], stores / "lgg.zarr",
                         lgg_test_patients(src), ["images2d", "--src", str(src), "--name", "lgg",
                                                  "--channel-names", "pre,flair,post"]))
    sections: list[str] = []
    for name, single, cv_configs, store, test, prep in datasets:
        t0 = time.perf_counter()
        _run([py, "-m", "preprocess", *prep, "--dst", str(stores), "--folds", str(FOLDS), "--fold-assignment",
              "balanced", "--test-subjects", ",".join(test)], env, logs / "preprocess.log", ok_codes=(0, 3))
        timings[f"preprocess {name}"] = time.perf_counter() - t0
        rows: list[tuple[str, str, Path]] = []
        if not args.skip_cv:
            cv_dirs = []
            for cv_config in cv_configs:  # each: folds, out-of-fold predictions and its postprocessing; no test
                cv_dir = out / "crossval" / cv_config
                t0 = time.perf_counter()
                _run([py, "launch/crossval.py", "--config", str(REPO / "configs" / f"{cv_config}.yaml"), "--ranks",
                      str(args.ranks), "--output", str(cv_dir), f"data.store={store}", *args.overrides], env,
                     logs / f"crossval_{cv_config}.log", ok_codes=(0, 3))
                timings[f"crossval {cv_config} (folds + out of fold + choices)"] = time.perf_counter() - t0
                # out of fold, each case is scored by the one fold model that never saw it (not the ensemble)
                rows += [(f"{cv_config}: {FOLDS} fold models", "out of fold", cv_dir / "oof"),
                         (f"{cv_config}: {FOLDS} fold models + pp", "out of fold", cv_dir / "oof" / "postprocessed")]
                cv_dirs.append(cv_dir)
            chosen = cv_dirs[0]
            if len(cv_dirs) > 1:  # the configuration (or ensemble of them) with the best out-of-fold Dice
                chosen = out / "crossval" / f"{name}_chosen"
                _run([py, "launch/crossval.py", "choose", *map(str, cv_dirs), "--output", str(chosen)], env,
                     logs / f"choose_{name}.log")
            label = json.loads((chosen / "choice.json").read_text())["winner"] if len(cv_dirs) > 1 else [chosen.name]
            t0 = time.perf_counter()
            tst = out / "eval" / f"{name}_cv" / "test"
            _run([py, "launch/evaluate.py", "--model", str(chosen), "--store", str(store), "--split", "test",
                  "--postprocess", "--output", str(tst)], env, logs / f"evaluate_{name}_cv.log", ok_codes=(0, 3))
            timings[f"evaluate {name} CV choice on the test split"] = time.perf_counter() - t0
            what = f"chosen on out of fold: {' + '.join(label)}"
            rows += [(what, "test split", tst), (f"{what} + pp", "test split", tst / "postprocessed")]
        if not args.skip_single:
            run_dir = out / "runs" / single
            t0 = time.perf_counter()
            _run([_deepspeed(), "--num_gpus", str(args.ranks), "--master_addr", "127.0.0.1", "--master_port",
                  str(_free_port()), "launch/train.py", "--config", str(REPO / "configs" / f"{single}.yaml"),
                  f"data.store={store}", "data.val_folds=[0]", f"run.output_root={out}", f"run.name={single}",
                  *args.overrides], env, logs / f"train_{single}.log")
            timings[f"train {single}"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            val, tst = out / "eval" / single / "validation", out / "eval" / single / "test"
            _run([py, "launch/evaluate.py", "--model", str(run_dir), "--store", str(store), "--output", str(val),
                  "--choose-postprocessing"], env, logs / f"evaluate_{single}.log", ok_codes=(0, 3))
            _run([py, "launch/evaluate.py", "--model", str(run_dir), "--store", str(store), "--split", "test",
                  "--output", str(tst), "--postprocess", str(val / "postprocessing.json")], env,
                 logs / f"evaluate_{single}.log", ok_codes=(0, 3))
            timings[f"evaluate {single}"] = time.perf_counter() - t0
            rows += [(f"{single}: single model", "fold 0", val),
                     (f"{single}: single model + pp", "fold 0", val / "postprocessed"),
                     (f"{single}: single model", "test split", tst),
                     (f"{single}: single model + pp", "test split", tst / "postprocessed")]
        title = ("BraTS (3D; Dice/HD95 per region, whole cases in the source grid)" if name == "brats" else
                 "LGG (2D FLAIR abnormality; slice Dice and per-patient Dice of the stacked slices)")
        sections += [f"## {title}", "", f"Test split: {', '.join(test)}.", "",
                     *table(rows, per_subject=name == "lgg"), ""]
    lines = [
        "# distseg: results on the shared real data", "",
        f"Hardware: {_hardware()}. Date: {time.strftime('%Y-%m-%d')}.",
        f"Command: `python -m launch.reproduce {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
        "Roles: **test** = the test split set aside at preprocessing, never trained on, validated on or chosen on "
        "(checkpoint, postprocessing, configuration): the numbers to report. **validation** = cases that chose "
        "something (out-of-fold cases chose each fold's checkpoint and the postprocessing; fold 0 chose the single "
        "model's checkpoint and postprocessing): optimistic. `+ pp` = with the postprocessing (per-region "
        "thresholds, connected components) chosen on the validation cases. Whole cases / whole slices, sliding "
        "window, no test-time augmentation.", "",
        *sections, "## Stage times (s)", "", *[f"- {k}: {v:.0f}" for k, v in timings.items()],
        f"- total: {sum(timings.values()):.0f}",
    ]
    results = out / "results.md"
    results.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sys.stdout.write("\n".join(lines) + "\n")
    logger.info("wrote %s", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
