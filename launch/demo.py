"""The end-to-end demo: synthetic data -> Ray preprocessing -> 2-rank DeepSpeed training -> evaluation -> prediction.

    python -m launch.demo [--kind brats|images2d] [--out DIR] [--cases N] [--config YAML] [--ranks 2] [key=value ...]
    make demo      3D: synthetic BraTS volumes, unet3d (configs/demo.yaml), output in demo_out/
    make demo2d    2D: synthetic image/mask pairs, res_inception_unet (configs/demo2d.yaml), output in demo2d_out/

Every stage is the product's own command in a subprocess, exactly as a user would type it:
1. synthesis      python -m preprocess synth --kind K --n N --dst OUT/raw --seed 0
2. preprocessing  python -m preprocess {brats|images2d} --src OUT/raw --dst OUT/stores --name NAME --folds 4
                  (local Ray)
3. training       deepspeed --num_gpus 2 launch/train.py --config CONFIG data.store=STORE run.output_root=OUT
                  (ZeRO 2, bf16, CPU ranks over gloo)
4. evaluation     python launch/evaluate.py --model RUN --store STORE --fold 0 --output OUT/evaluation
                  (the held-out fold, whole cases, sliding window)
5. prediction     python launch/predict.py --model RUN --input RAW_CASE --output OUT/prediction --postprocess
                  (one raw held-out case: NIfTI in the input's geometry / mask PNG, + overlay PNG)
Then one summary: held-out Dice / HD95 per region from the evaluator, seconds per stage, where the checkpoints,
TensorBoard logs, metrics table, box plots and predictions are, and the `tensorboard` command. It is also written
to OUT/demo_summary.json. Extra `key=value` arguments go to the training config.

Rerun: a complete stage is skipped or resumed, never redone. Synthesis is skipped when OUT/raw holds the same
cases; preprocessing converts only new or changed cases; training resumes from the newest complete checkpoint and a
finished run is not relaunched; evaluation and prediction are skipped when their outputs exist for the checkpoint
they would use now (OUT/demo_state.json records which checkpoint produced them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distseg.inference.loading import POSTPROCESSING_FILE
from launch.demo_report import StageResult, held_out_metrics, summary_text, write_summary

logger = logging.getLogger("launch.demo")
REPO = Path(__file__).resolve().parents[1]
STATE_FILE = "demo_state.json"
FOLDS = 4
"""K of the K-fold split written by preprocessing; the config's data.val_folds are the held-out cases."""


@dataclass(frozen=True)
class DemoKind:
    """What differs between the 3D and the 2D demo."""

    kind: str
    """`python -m preprocess` data kind: "brats" or "images2d" (also the `synth --kind`)."""
    title: str
    """How the summary names the demo."""
    config: Path
    """Training config."""
    out: Path
    """Default output folder."""
    cases: int
    """Default number of synthetic cases."""
    store_name: str
    """Store name: OUT/stores/<name>.zarr + <name>.manifest.parquet."""


KINDS = {
    "brats": DemoKind("brats", "3D, synthetic BraTS volumes", REPO / "configs" / "demo.yaml", REPO / "demo_out", 12,
                      "demo"),
    "images2d": DemoKind("images2d", "2D, synthetic image/mask pairs", REPO / "configs" / "demo2d.yaml",
                         REPO / "demo2d_out", 40, "demo2d"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=sorted(KINDS), default="brats",
                        help="brats: the 3D demo (default); images2d: the 2D demo")
    parser.add_argument("--out", type=Path, default=None, help="where everything is written (demo_out / demo2d_out)")
    parser.add_argument("--cases", type=int, default=None, help="synthetic cases to generate (12 / 40)")
    parser.add_argument("--config", type=Path, default=None, help="training config (configs/demo.yaml / demo2d.yaml)")
    parser.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (CPU processes here, GPUs on a GPU box)")
    parser.add_argument("overrides", nargs="*", help="training config overrides, key=value")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_cli() -> str:
    """The `deepspeed` launcher of this interpreter's environment (the venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "deepspeed"
    found = str(beside) if beside.exists() else shutil.which("deepspeed")
    if not found:
        raise SystemExit("demo: the `deepspeed` launcher was not found; install the project (`make venv`)")
    return found


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # One machine: Ray and gloo stay on loopback.
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # The commands run from this checkout, so they import this checkout's packages (not another installed copy).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _run(cmd: list[str], env: dict[str, str]) -> float:
    """Run one product command from the repository root; its wall-clock seconds. A failure stops the demo."""
    logger.info("$ %s", " ".join(cmd))
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=REPO, env=env)
    if rc != 0:
        raise SystemExit(f"demo: step failed with exit status {rc}: {' '.join(cmd)}")
    return time.perf_counter() - t0


class DemoState:
    """OUT/demo_state.json: what each finished stage was made from, so a rerun can tell whether it is complete."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.data = {}  # missing or unreadable: every stage checks its own outputs again

    def matches(self, stage: str, record: dict[str, Any]) -> bool:
        return self.data.get(stage) == record

    def record(self, stage: str, record: dict[str, Any]) -> None:
        """Written after the stage succeeded (atomically), never before."""
        from distseg.core.fileio import atomic_write

        self.data[stage] = record
        text = json.dumps(self.data, indent=1)
        atomic_write(self.path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def checkpoint_identity(run_dir: Path) -> dict[str, Any]:
    """The checkpoint `--model RUN` loads (best complete, else newest) and when it was saved: two checkpoints with
    the same tag (a run deleted and trained again) still differ."""
    from distseg.core.checkpoint import read_marker
    from distseg.inference.loading import ModelLoadError, resolve_checkpoint

    try:
        tag_dir = resolve_checkpoint(run_dir)
    except ModelLoadError as e:
        raise SystemExit(f"demo: {e}") from e
    marker = read_marker(tag_dir) or {}
    return {"checkpoint": str(tag_dir), "saved": marker.get("time")}


def held_out_case(store_path: Path, folds: list[int]) -> tuple[str, Path]:
    """The first (by id) labelled case of the held-out folds and the raw input it was converted from: the BraTS
    case folder, or the image file of a 2D case (both recorded in the store's case attributes)."""
    from distseg.data.store import Store

    store = Store.open(store_path)
    held = store.case_ids(folds=folds, labelled_only=True)
    if not held:
        raise SystemExit(f"demo: {store_path}: no labelled case in the held-out folds {folds}; expected some")
    attrs = store.case_attrs(held[0])
    source = Path(attrs["source_dir"])
    return held[0], source / attrs["source_image"] if "source_image" in attrs else source


def prediction_files(pred_dir: Path, kind: str, case_id: str) -> dict[str, Path]:
    """What `launch/predict.py` writes for one case (see distseg.inference.outputs)."""
    first = {"nifti": pred_dir / f"{case_id}.nii.gz"} if kind == "brats" else {"mask": pred_dir / f"{case_id}_mask.png"}
    return {**first, "overlay": pred_dir / f"{case_id}_overlay.png"}


# ------------------------------------------------------------------------------------------------ stages
def synthesise(demo: DemoKind, raw: Path, n: int, state: DemoState, env: dict[str, str]) -> StageResult:
    record = {"kind": demo.kind, "n": n, "seed": 0, "dst": str(raw)}
    if state.matches("synthesis", record) and raw.is_dir():
        return StageResult("synthesis", 0.0, True, f"{n} synthetic cases already in {raw}")
    seconds = _run([sys.executable, "-m", "preprocess", "synth", "--kind", demo.kind, "--n", str(n), "--dst",
                    str(raw), "--seed", "0"], env)
    state.record("synthesis", record)
    return StageResult("synthesis", seconds, False, f"{n} synthetic cases -> {raw}")


def preprocess(demo: DemoKind, raw: Path, stores: Path, env: dict[str, str]) -> StageResult:
    """Always runs: the converter itself skips unchanged cases (size + mtime, sha256 when only the mtime moved)."""
    import pyarrow.parquet as pq

    seconds = _run([sys.executable, "-m", "preprocess", demo.kind, "--src", str(raw), "--dst", str(stores),
                    "--name", demo.store_name, "--folds", str(FOLDS)], env)
    status = pq.read_table(stores / f"{demo.store_name}.manifest.parquet", columns=["status"]).column(0).to_pylist()
    n = {s: status.count(s) for s in ("ok", "skipped", "failed")}
    note = f"{n['ok']} converted, {n['skipped']} unchanged, {n['failed']} failed (local Ray)"
    return StageResult("preprocessing", seconds, n["ok"] == 0 and n["failed"] == 0, note)


def train(cfg: Any, config: Path, overrides: list[str], ranks: int, env: dict[str, str]) -> StageResult:
    from distseg.core import checkpoint

    newest = checkpoint.complete_checkpoints(cfg.run_dir / "checkpoints")
    done = newest[-1][0] if newest else 0
    if done >= cfg.train.steps:  # a finished run: relaunching would load the checkpoint and train nothing
        return StageResult("training", 0.0, True, f"finished: checkpoint {newest[-1][1]} >= train.steps "
                                                  f"{cfg.train.steps}")
    seconds = _run([_deepspeed_cli(), "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port",
                    str(_free_port()), "launch/train.py", "--config", str(config), *overrides], env)
    summary = json.loads((cfg.run_dir / "summary.json").read_text(encoding="utf-8"))
    how = f"resumed from {newest[-1][1]}, " if newest else ""
    per_step = summary.get("seconds_per_step")
    speed = f", {per_step:.2f} s/step" if per_step else ""
    note = (f"{how}{summary['step']} steps on {summary['world_size']} ranks (ZeRO {cfg.deepspeed.zero_stage}, "
            f"{cfg.deepspeed.precision}){speed}")
    return StageResult("training", seconds, False, note)


def evaluate(run_dir: Path, store: Path, folds: list[int], eval_dir: Path, state: DemoState,
             env: dict[str, str]) -> StageResult:
    record = {**checkpoint_identity(run_dir), "store": str(store), "folds": folds, "output": str(eval_dir)}
    complete = all((eval_dir / f).is_file() for f in ("summary.json", "evaluation.json", "metrics.parquet"))
    if state.matches("evaluation", record) and complete and (eval_dir / POSTPROCESSING_FILE).is_file():
        return StageResult("evaluation", 0.0, True, f"done for {Path(record['checkpoint']).name}")
    fold_args = [a for k in folds for a in ("--fold", str(k))]
    seconds = _run([sys.executable, "launch/evaluate.py", "--model", str(run_dir), "--store", str(store), *fold_args,
                    "--output", str(eval_dir), "--choose-postprocessing"], env)
    state.record("evaluation", record)
    return StageResult("evaluation", seconds, False, f"held-out fold(s) {folds}, whole cases, sliding window, "
                                                     f"{Path(record['checkpoint']).name}")


def predict(run_dir: Path, case_input: Path, files: dict[str, Path], pred_dir: Path, state: DemoState,
            env: dict[str, str], postprocessing: Path) -> StageResult:
    """Raw input through `launch/predict.py` with the postprocessing chosen on the held-out fold (`postprocessing`,
    the file the evaluation stage wrote)."""
    record = {**checkpoint_identity(run_dir), "input": str(case_input), "output": str(pred_dir),
              "postprocessing": str(postprocessing)}
    if state.matches("prediction", record) and all(p.is_file() for p in files.values()):
        return StageResult("prediction", 0.0, True, f"done for {Path(record['checkpoint']).name}")
    seconds = _run([sys.executable, "launch/predict.py", "--model", str(run_dir), "--input", str(case_input),
                    "--output", str(pred_dir), "--postprocess", str(postprocessing)], env)
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"demo: launch/predict.py did not write {', '.join(missing)}")
    state.record("prediction", record)
    return StageResult("prediction", seconds, False, f"raw input {case_input}")


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    demo = KINDS[args.kind]
    out = (args.out or demo.out).resolve()
    config = (args.config or demo.config).resolve()
    n_cases = args.cases or demo.cases
    if n_cases < 2 or args.ranks < 1:
        raise SystemExit("demo: expected --cases >= 2 and --ranks >= 1")
    raw, stores = out / "raw", out / "stores"
    store = stores / f"{demo.store_name}.zarr"
    env = _env()
    state = DemoState(out / STATE_FILE)
    t0 = time.perf_counter()

    from distseg.config import ConfigError, load_config

    overrides = [f"data.store={store}", f"run.output_root={out}", *args.overrides]
    try:  # check the config before spending minutes on data
        cfg = load_config(config, overrides)
    except ConfigError as e:
        raise SystemExit(f"demo: {e}") from e
    out.mkdir(parents=True, exist_ok=True)
    folds = list(cfg.data.val_folds)
    run_dir = cfg.run_dir
    stages = [synthesise(demo, raw, n_cases, state, env), preprocess(demo, raw, stores, env),
              train(cfg, config, overrides, args.ranks, env)]
    eval_dir, pred_dir = out / "evaluation", out / "prediction"
    stages.append(evaluate(run_dir, store, folds, eval_dir, state, env))
    case_id, case_input = held_out_case(store, folds)
    files = prediction_files(pred_dir, demo.kind, case_id)
    stages.append(predict(run_dir, case_input, files, pred_dir, state, env, eval_dir / POSTPROCESSING_FILE))

    report = {
        "kind": demo.kind, "title": demo.title, "seconds": time.perf_counter() - t0,
        "stages": [s.to_dict() for s in stages],
        "evaluation": held_out_metrics(eval_dir), "checkpoint": state.data["evaluation"]["checkpoint"],
        "paths": {"out": str(out), "raw": str(raw), "store": str(store),
                  "manifest": str(stores / f"{demo.store_name}.manifest.parquet"),
                  "run": str(run_dir), "checkpoints": str(run_dir / "checkpoints"), "tensorboard": str(run_dir / "tb"),
                  "evaluation": str(eval_dir), "input": str(case_input), **{k: str(v) for k, v in files.items()}},
    }
    write_summary(out / "demo_summary.json", report)
    sys.stdout.write(summary_text(report, make_target="demo" if demo.kind == "brats" else "demo2d"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
