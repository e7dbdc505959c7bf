"""Reproduce the results tables on the shared real data (`make reproduce`): convert, train the budget configs,
evaluate held-out subjects on whole cases, write the tables.

    python -m launch.reproduce [--data ../shared/data] [--out reproduce_out] [--only brats,lgg] [--ranks 2]
                               [--configs brats_budget,lgg_budget_unet,...] [key=value ...]

Each stage runs the product's own command in a subprocess, as a user types it:
1. `python -m preprocess brats` on the 12 labelled BraTS cases (2018 + 2021 namings; folds 4, validation fold 2 =
   4 cases never trained on) and `python -m preprocess images2d` on the LGG kaggle_3m patients (folds per patient,
   validation fold 0 = 3 patients);
2. `deepspeed --num_gpus 2 launch/train.py --config configs/<budget>.yaml` for each budget config (each stops at its
   `train.max_minutes` with a final checkpoint; a rerun resumes or, when finished, does nothing);
3. `python launch/evaluate.py --model RUN --store STORE` on the validation fold (whole cases / whole slices, sliding
   window, postprocessing chosen on the same cases and reported separately);
4. `python launch/evaluate.py compare` -> `<out>/results.md`: the 2D table (Dice, IoU, pixel accuracy, precision,
   recall, parameters, training minutes, per-patient Dice) and the BraTS table (WT/TC/ET Dice, sensitivity,
   specificity, HD95), with the hardware and the commands.
Extra `key=value` arguments go to every training run (e.g. `train.max_minutes=5` for a quick pass).
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

BRATS_CONFIGS = ["brats_budget"]
LGG_CONFIGS = ["lgg_budget_res_inception_unet", "lgg_budget_resnet50_unet", "lgg_budget_unet"]
BRATS_SOURCES = ("brats2018", "brats2021")
LGG_SOURCE = "seg2d/lgg-kaggle3m"


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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m launch.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared real data")
    p.add_argument("--out", type=Path, default=REPO / "reproduce_out")
    p.add_argument("--only", default="brats,lgg", help="which tables: brats, lgg or both")
    p.add_argument("--configs", default="", help="comma list of config names (default: every budget config)")
    p.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks per training run")
    p.add_argument("--skip-train", action="store_true", help="evaluate the runs already in --out")
    p.add_argument("--tta", choices=("none", "mirror"), default="none",
                   help="test-time augmentation of the evaluation (mirror: every flip, as nnU-Net); with mirror the "
                        "evaluations go to <out>/eval-mirror and the tables to <out>/results-mirror.md")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every training run")
    args = p.parse_args(argv)
    data, out = args.data.resolve(), args.out.resolve()
    if not (data / "brats2018").is_dir():
        raise SystemExit(f"reproduce: {data} does not hold the shared real data (expected brats2018/, "
                         f"{LGG_SOURCE}/); pass --data")
    env = dict(os.environ)
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    py = sys.executable
    only = set(args.only.split(","))
    chosen = [c for c in args.configs.split(",") if c]
    logs = out / "logs"
    stores = out / "stores"
    timings: dict[str, float] = {}
    plan: list[tuple[str, Path]] = []
    if "brats" in only:
        t0 = time.perf_counter()
        _run([py, "-m", "preprocess", "brats", "--src", str(_link_cases(data, out)), "--dst", str(stores),
              "--name", "brats_real", "--folds", "4"], env, logs / "preprocess.log")
        timings["preprocess brats"] = time.perf_counter() - t0
        plan += [(c, stores / "brats_real.zarr") for c in BRATS_CONFIGS if not chosen or c in chosen]
    if "lgg" in only:
        t0 = time.perf_counter()
        _run([py, "-m", "preprocess", "images2d", "--src", str(data / LGG_SOURCE), "--dst", str(stores),
              "--name", "lgg", "--folds", "4", "--channel-names", "pre,flair,post"], env, logs / "preprocess.log")
        timings["preprocess lgg"] = time.perf_counter() - t0
        plan += [(c, stores / "lgg.zarr") for c in LGG_CONFIGS if not chosen or c in chosen]
    evals = []
    for name, store in plan:
        config = REPO / "configs" / f"{name}.yaml"
        overrides = [f"data.store={store}", f"run.output_root={out}", f"run.name={name}", *args.overrides]
        run_dir = out / "runs" / name
        if not args.skip_train:
            t0 = time.perf_counter()
            _run([_deepspeed(), "--num_gpus", str(args.ranks), "--master_addr", "127.0.0.1", "--master_port",
                  str(_free_port()), "launch/train.py", "--config", str(config), *overrides], env,
                 logs / f"train_{name}.log")
            timings[f"train {name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        eval_dir = out / ("eval" if args.tta == "none" else f"eval-{args.tta}") / name
        _run([py, "launch/evaluate.py", "--model", str(run_dir), "--store", str(store), "--output", str(eval_dir),
              "--tta", args.tta], env, logs / f"evaluate_{name}.log")
        timings[f"evaluate {name}"] = time.perf_counter() - t0
        evals.append(eval_dir)
    table = subprocess.run([py, "launch/evaluate.py", "compare", *map(str, evals)], cwd=REPO, env=env,
                           capture_output=True, text=True, check=True).stdout
    post = [d / "postprocessed" for d in evals if (d / "postprocessed" / "evaluation.json").is_file()]
    post_table = ""
    if post:
        post_table = subprocess.run([py, "launch/evaluate.py", "compare", *map(str, post)], cwd=REPO, env=env,
                                    capture_output=True, text=True, check=True).stdout
    summaries = {d.name: json.loads((out / "runs" / d.name / "summary.json").read_text())
                 for d in evals if (out / "runs" / d.name / "summary.json").is_file()}
    lines = [
        "# distseg: results on the shared real data",
        "",
        f"Hardware: {_hardware()}. Date: {time.strftime('%Y-%m-%d')}.",
        f"Command: `python -m launch.reproduce {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "Held out (never trained on): BraTS fold 2 of 4 (4 cases), LGG fold 0 of 4 (3 patients, every slice).",
        "Whole cases / whole slices, sliding window, "
        + ("no test-time augmentation" if args.tta == "none" else "mirror test-time augmentation (every flip)")
        + "; metrics in the source grid.",
        "",
        table,
    ]
    if post_table:
        lines += ["", "## With the connected-component postprocessing chosen on the same cases", "",
                  "(chosen and scored on the same held-out cases, so optimistic; shown for reference)", "", post_table]
    lines += ["", "## Runs", ""]
    keys = ("step", "elapsed_s", "seconds_per_step", "world_size", "val_dice", "budget")
    for name, s in summaries.items():
        lines.append(f"- {name}: {json.dumps({k: s[k] for k in keys if k in s})}")
    lines += ["", "## Stage times (s)", ""] + [f"- {k}: {v:.0f}" for k, v in timings.items()]
    results = out / ("results.md" if args.tta == "none" else f"results-{args.tta}.md")
    results.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sys.stdout.write("\n".join(lines) + "\n")
    logger.info("wrote %s", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
