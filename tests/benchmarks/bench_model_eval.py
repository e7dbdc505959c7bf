"""Peak memory of model-mode evaluation (`evaluate_model`: predict, write, score, keep probabilities on disk, choose
the postprocessing) over 10, 100 and 1000 cases: flat when cases stream.

    python tests/benchmarks/bench_model_eval.py [--sizes 10 100 1000] [--shape 64] [--dst DIR]

A synthetic 2D store (`preprocess synth` + `preprocess images2d`, the real CLI) of max(sizes) images and a tiny
untrained unet (configs/debug_image2d.yaml); each size runs `evaluate_model(..., choose_pp=True)` in a fresh
interpreter that reports its high-water RSS. What grows with the cases is only the rows (~1 KB per case) and the
files on disk. Not a timing benchmark.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, resource, sys
from pathlib import Path
import torch
sys.path.insert(0, {repo!r})
from distseg.config import load_config
from distseg.data.store import Store
from distseg.evaluation.model import evaluate_model
from distseg.inference.ensemble import ModelSet
from distseg.inference.loading import LoadedModel, ModelIO
from distseg.models import build_model

torch.set_num_threads(1)
store = Store.open({store!r})
cfg = load_config({repo!r} + "/configs/debug_image2d.yaml", ["data.store=" + {store!r}])
io = ModelIO.from_store(cfg, store)
torch.manual_seed(0)
net = build_model(cfg.model.name, cfg.model.preset, in_channels=io.in_channels, out_channels=io.out_channels).eval()
cases = store.case_ids(labelled_only=True)[:{n}]
evaluate_model(ModelSet([LoadedModel(io, cfg, module=net)]), store, cases, Path({out!r}), choose_pp=True,
               tensorboard=False)
print(json.dumps({{"cases": len(cases), "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--shape", type=int, default=64, help="image side (pixels)")
    p.add_argument("--dst", type=Path, default=None, help="working folder (default: a temporary one)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dst or Path(tmp)
        store = root / "bench.zarr"
        if not store.is_dir():
            py = [sys.executable, "-m", "preprocess"]
            subprocess.run([*py, "synth", "--kind", "images2d", "--n", str(max(args.sizes)), "--dst",
                            str(root / "raw"), "--shape", f"{args.shape}x{args.shape}"], check=True, cwd=REPO)
            subprocess.run([*py, "images2d", "--src", str(root / "raw"), "--dst", str(root), "--name", "bench",
                            "--serial"], check=True, cwd=REPO, capture_output=True)
        rows = []
        for n in args.sizes:
            code = CHILD.format(repo=str(REPO), store=str(store), n=n, out=str(root / f"eval{n}"))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_mib"]
    print(f"model-mode evaluation, {args.shape}x{args.shape} images, tiny unet, postprocessing chosen")
    print("| cases | peak RSS MiB | x smallest |")
    print("| --- | --- | --- |")
    for r in rows:
        print(f"| {r['cases']} | {r['peak_mib']:.0f} | {r['peak_mib'] / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
