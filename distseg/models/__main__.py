"""`python -m distseg.models summary NAME [--preset P] [--input-shape C,H,W[,D]]` and `... list`."""

from __future__ import annotations

import argparse
import sys

import torch

from distseg.models.registry import available_models, build_model, get_spec
from distseg.models.summary import format_summary, summarize


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(t) for t in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--input-shape must be ints like 3,256,256, got {text!r}") from err
    if len(dims) not in (3, 4) or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"--input-shape must be C,H,W or C,D,H,W with positive sizes, got {text!r}")
    return dims


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distseg.models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered models and their presets")
    p = sub.add_parser("summary", help="layers, output shapes, parameters and FLOPs per sample")
    p.add_argument("name", help=f"one of: {', '.join(available_models())}")
    p.add_argument("--preset", default="default")
    p.add_argument("--input-shape", type=_shape, default=None,
                   help="C,H,W (2D) or C,D,H,W (3D); default in_channels at 256² (2D) or 128³ (3D)")
    p.add_argument("--device", default="meta",
                   help="'meta' (default: shapes only, no memory) or a real device such as cpu")
    args = parser.parse_args(argv)

    if args.command == "list":
        for name in available_models():
            spec = get_spec(name)
            sys.stdout.write(f"{name:<22} presets: {', '.join(spec.presets):<16} {spec.description}\n")
        return 0
    try:
        with torch.device(args.device):
            model = build_model(args.name, args.preset)
    except (KeyError, TypeError, ValueError) as err:
        parser.error(str(err))
    shape = args.input_shape or (model.in_channels, *([256] * 2 if model.spatial_dims == 2 else [128] * 3))
    if len(shape) != model.spatial_dims + 1 or shape[0] != model.in_channels:
        parser.error(f"--input-shape {shape} does not fit {args.name}: expected {model.in_channels} channels and "
                     f"{model.spatial_dims} spatial sizes")
    summary = summarize(model, shape, device=args.device)
    sys.stdout.write(format_summary(summary, title=f"{args.name} (preset {args.preset})") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
