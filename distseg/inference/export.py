"""Export a trained model: consolidated fp32 weights + the YAML that rebuilds it, optionally ONNX.

    python -m distseg.inference.export RUN_OR_TAG --out DIR [--onnx] [--opset 17]

Writes ``DIR/model.pt`` (a plain state dict, loadable with ``torch.load(..., weights_only=True)``), ``DIR/model.yaml``
(format, the run's resolved experiment config, the data contract `io`, where it came from) and with ``--onnx``
``DIR/model.onnx``, which shares ``model.yaml`` (the predictor reads ``<stem>.yaml`` beside either file). A
postprocessing rule chosen for the run is copied along. The ONNX graph has a dynamic batch
axis and dynamic spatial axes for sizes that are multiples of the model's total stride (sliding windows are); it is
checked against PyTorch with onnxruntime on the export shape before the file is kept.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from distseg.config import to_dict
from distseg.core import exit_codes
from distseg.data.location import path_or_url
from distseg.inference.loading import EXPORT_FORMAT, POSTPROCESSING_FILE, LoadedModel, ModelLoadError, load_model
from distseg.inference.outputs import atomic_write

logger = logging.getLogger(__name__)

ONNX_ATOL = 1e-3
"""Largest |onnxruntime - torch| logit difference accepted at export (fp32 on CPU; typical: ~1e-5)."""


def sidecar(model: LoadedModel) -> dict[str, Any]:
    """The YAML document that rebuilds `model` (what `distseg.inference.predictor` reads beside model.pt /
    model.onnx)."""
    return {
        "format": EXPORT_FORMAT,
        "config": to_dict(model.config),
        "io": model.io.to_dict(),
        "source": {**{k: v for k, v in model.meta.items() if k in ("run", "tag", "val_dice")},
                   "checkpoint": model.source, "step": model.step, "parameters": model.parameters},
    }


def export_onnx(model: LoadedModel, path: Path, opset: int = 17) -> float:
    """Write `model` as ONNX at `path`; returns the max |onnxruntime - torch| on a random window-shaped batch."""
    import onnxruntime as ort

    assert model.module is not None
    module = model.module.float().eval()
    window = tuple(model.io.patch_size)
    x = torch.randn(2, model.io.in_channels, *window)
    spatial = {i + 2: f"s{i}" for i in range(len(window))}
    axes = {"image": {0: "batch", **spatial}, "logits": {0: "batch", **spatial}}

    diffs: list[float] = []

    def write(tmp: Path) -> None:
        # The TorchScript-based exporter keeps `dynamic_axes`; sizes that the stride divides need no pad/crop ops.
        torch.onnx.export(module, (x,), str(tmp), input_names=["image"], output_names=["logits"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            want = module(x).numpy()
        diff = float(np.abs(got - want).max())
        if not diff <= ONNX_ATOL:
            raise RuntimeError(f"ONNX export of {model.config.model.name}: max |onnxruntime - torch| = {diff:.3g} "
                               f"> {ONNX_ATOL}; not kept")
        diffs.append(diff)

    atomic_write(path, write)
    return diffs[0]


def export(model_path: Path, out_dir: Path, onnx: bool = False, opset: int = 17) -> dict[str, Path]:
    """Export the model at `model_path` (run folder or checkpoint tag, or an exported model.pt) into `out_dir`."""
    model = load_model(model_path, "cpu")
    if model.module is None:
        raise ModelLoadError(f"{model_path}: already an ONNX model; export from its run or checkpoint")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    state = {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in model.module.state_dict().items()}
    written["weights"] = atomic_write(out_dir / "model.pt", lambda tmp: torch.save(state, tmp))
    doc = yaml.safe_dump(sidecar(model), sort_keys=False, default_flow_style=None)
    written["config"] = atomic_write(out_dir / "model.yaml", lambda tmp: tmp.write_text(doc, encoding="utf-8"))
    if onnx:
        diff = export_onnx(model, out_dir / "model.onnx", opset)
        written["onnx"] = out_dir / "model.onnx"
        logger.info("ONNX export checked against torch: max |diff| %.2e", diff)
    run = model.meta.get("run")
    rule = Path(run) / POSTPROCESSING_FILE if run else None
    if rule is not None and rule.is_file():
        written["postprocessing"] = Path(shutil.copy2(rule, out_dir / POSTPROCESSING_FILE))
    return written


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m distseg.inference.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=path_or_url,
                   help="run folder (best, else newest complete checkpoint) or checkpoint tag, local or s3://...")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (checked with onnxruntime)")
    p.add_argument("--opset", type=int, default=17)
    args = p.parse_args(argv)
    try:
        written = export(args.model, args.out, args.onnx, args.opset)
    except (ModelLoadError, RuntimeError, ImportError) as e:
        logger.error("%s", e)
        return exit_codes.USAGE
    for what, path in written.items():
        sys.stdout.write(f"{what}: {path}\n")
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
