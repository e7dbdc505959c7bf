"""The end-to-end demo (`make demo`): synthetic BraTS → Ray preprocessing → 2-rank DeepSpeed training → summary.

    python -m launch.demo [--out demo_out] [--cases 12] [key=value ...]

Each stage runs the product's real command in a subprocess, exactly as a user would type it:
1. `python -m preprocess synth --kind brats ...`   (skipped when the raw cases are already there)
2. `python -m preprocess brats ...`                 (local Ray; a rerun converts only what is missing)
3. `deepspeed --num_gpus 2 launch/train.py --config configs/demo.yaml ...`  (ZeRO 2, bf16, CPU ranks over gloo;
   `resume=auto`, so a rerun continues from the newest complete checkpoint instead of starting over)
Then it prints the validation Dice per region, where the checkpoints and TensorBoard logs are, and the
`tensorboard` command. Extra `key=value` arguments are passed to the training config.
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
from pathlib import Path

logger = logging.getLogger("launch.demo")
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict[str, str], ok_codes: tuple[int, ...] = (0,)) -> int:
    logger.info("$ %s", " ".join(cmd))
    rc = subprocess.call(cmd, cwd=REPO, env=env)
    if rc not in ok_codes:
        raise SystemExit(f"demo: step failed with exit status {rc}: {' '.join(cmd)}")
    return rc


def _deepspeed_cli() -> str:
    """The `deepspeed` launcher of this interpreter's environment (the venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "deepspeed"
    found = str(beside) if beside.exists() else shutil.which("deepspeed")
    if not found:
        raise SystemExit("demo: the `deepspeed` launcher was not found; install the project (`make venv`)")
    return found


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "demo_out", help="where everything is written")
    parser.add_argument("--cases", type=int, default=12, help="synthetic BraTS cases to generate")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (CPU processes here, GPUs on a GPU box)")
    parser.add_argument("overrides", nargs="*", help="training config overrides, key=value")
    args = parser.parse_args(argv)

    out = args.out.resolve()
    raw, stores = out / "raw", out / "stores"
    env = dict(os.environ)
    # One machine: Ray and gloo stay on loopback.
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    py = sys.executable

    if not raw.is_dir() or not any(raw.iterdir()):
        _run([py, "-m", "preprocess", "synth", "--kind", "brats", "--n", str(args.cases), "--dst", str(raw),
              "--seed", "0"], env)
    else:
        logger.info("synthetic cases already in %s", raw)
    _run([py, "-m", "preprocess", "brats", "--src", str(raw), "--dst", str(stores), "--name", "demo",
          "--folds", "4"], env)
    store = stores / "demo.zarr"

    overrides = [f"data.store={store}", f"run.output_root={out}", *args.overrides]
    _run([_deepspeed_cli(), "--num_gpus", str(args.ranks), "--master_addr", "127.0.0.1",
          "--master_port", str(_free_port()), "launch/train.py", "--config", str(args.config), *overrides], env)

    from distseg.config import load_config

    cfg = load_config(args.config, overrides)
    run_dir = Path(cfg.run.output_root) / "runs" / cfg.run.name
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    lines = ["", "distseg demo finished.", f"  store:        {store}  (manifest {stores / 'demo.manifest.parquet'})"]
    dice = summary.get("val_dice", {})
    if dice:
        per_region = ", ".join(f"{k} {v:.3f}" for k, v in dice.items())
        lines.append(f"  validation Dice per region (step {summary.get('step')}): {per_region}")
    if summary.get("resumed_from"):
        lines.append(f"  resumed from: checkpoint {summary['resumed_from']} (rerun of an earlier demo)")
    lines += [f"  checkpoints:  {run_dir / 'checkpoints'}",
              f"  TensorBoard:  {run_dir / 'tb'}",
              f"  view it with: tensorboard --logdir {run_dir / 'tb'} --host 127.0.0.1",
              "  rerun `make demo` to resume from the newest complete checkpoint."]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
