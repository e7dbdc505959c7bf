"""Loading a trained model: a run folder (its best complete checkpoint), a checkpoint tag, an exported ``model.pt``
(+ ``model.yaml``) or ``model.onnx`` -> `LoadedModel` (the module or ONNX session plus its data contract, `ModelIO`).

What a model needs besides its weights is its `ModelIO`: the input channels, the target and regions, the training
mode and window, the store kind and 2D resize. Checkpoints written by the trainer carry it in trainer_state.json
(``io``); exported files carry it in the YAML beside the weights. Older checkpoints fall back to the run's store.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from distseg.config import ExperimentConfig, from_dict
from distseg.data.layout import StoreError
from distseg.data.store import Store
from distseg.data.targets import num_targets, target_names
from distseg.inference.postprocess import Postprocessing
from distseg.inference.window import window_for

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "distseg-model/1"
POSTPROCESSING_FILE = "postprocessing.json"


class ModelLoadError(Exception):
    """A model path cannot be loaded (the message names the file and what was expected)."""


@dataclass
class ModelIO:
    """The data contract of a trained model (what the store told the trainer)."""

    kind: str
    """Store kind: "brats3d" or "images2d"."""
    channels: list[str]
    """Input channel names, in order (BraTS: t1, t1ce, t2, flair)."""
    target: str
    """"regions" or "binary" (see distseg.data.targets)."""
    regions: dict[str, list[int]]
    """Store regions in canonical label values (BraTS WT/TC/ET)."""
    mode: str
    """Training data mode: patch3d, slice2d or image2d."""
    patch_size: list[int]
    """Training patch: the sliding window (Z, Y, X) for patch3d, (Y, X) for the 2D modes."""
    resize: int | None = None
    """2D stores: the size images were resized to on conversion (None = kept)."""
    downsample: int = 1
    """The model runs at 1/downsample of the stored resolution (data.downsample)."""

    @property
    def in_channels(self) -> int:
        return len(self.channels)

    @property
    def out_channels(self) -> int:
        return num_targets(self.target, self.regions)

    @property
    def output_names(self) -> list[str]:
        return target_names(self.target, self.regions)

    @property
    def decode_regions(self) -> dict[str, list[int]]:
        """Output channel -> canonical labels it covers (binary target: one channel covering every tumour label)."""
        if self.target == "binary":  # every tumour label of the store (BraTS: 1, 2, 3 = the whole tumour)
            return {"foreground": sorted({int(v) for vals in self.regions.values() for v in vals})}
        return {k: list(v) for k, v in self.regions.items()}

    def window(self) -> tuple[int, ...]:
        """The sliding window over stored (Z, Y, X): the 3D patch, or (1, Y, X) for 2D models."""
        return window_for(self.mode, self.patch_size)

    @classmethod
    def from_store(cls, cfg: ExperimentConfig, store: Store) -> ModelIO:
        return cls(kind=store.kind, channels=list(store.channels), target=cfg.data.target,
                   regions={k: list(v) for k, v in store.regions.items()}, mode=cfg.data.mode,
                   patch_size=list(cfg.data.patch_size), resize=store.attrs.get("resize"),
                   downsample=cfg.data.downsample)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelIO:
        return cls(**{k: d[k] for k in ("kind", "channels", "target", "regions", "mode", "patch_size")},
                   resize=d.get("resize"), downsample=int(d.get("downsample", 1)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    """A model ready to run: a torch module (fp32, eval mode) or an ONNX session, plus its contract."""

    io: ModelIO
    config: ExperimentConfig
    module: torch.nn.Module | None = None
    onnx_session: Any = None
    source: str = ""
    """What was loaded (run/tag/file), for logs and evaluation metadata."""
    step: int | None = None
    postprocessing: Postprocessing | None = None
    """The rule chosen on validation (`postprocessing.json` beside the model), if any."""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def parameters(self) -> int | None:
        if self.module is not None:
            return sum(p.numel() for p in self.module.parameters())
        return self.meta.get("parameters")


# ------------------------------------------------------------------------------------------------ loading
def build_inference_model(cfg: ExperimentConfig, io: ModelIO) -> torch.nn.Module:
    """The registered model of `cfg` with the channels `io` implies, in eval mode (no deep-supervision lists)."""
    from distseg.models import build_model

    overrides = {**cfg.model.overrides, "in_channels": io.in_channels, "out_channels": io.out_channels}
    return build_model(cfg.model.name, cfg.model.preset, **overrides).eval()


def _config_from_dict(d: dict[str, Any], where: str) -> ExperimentConfig:
    try:
        return from_dict(ExperimentConfig, d)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{where}: the saved config does not load with this version of distseg ({e})") from e


def _io_for_checkpoint(state: dict[str, Any], cfg: ExperimentConfig, tag_dir: Path) -> ModelIO:
    if "io" in state:
        return ModelIO.from_dict(state["io"])
    try:  # checkpoints from before `io` was recorded: ask the run's store
        return ModelIO.from_store(cfg, Store.open(cfg.data.store))
    except StoreError as e:
        raise ModelLoadError(f"{tag_dir}: the checkpoint does not record its data contract (io) and the run's store "
                             f"is unavailable ({e}); export it where the store is reachable") from e


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a COMPLETE DeepSpeed checkpoint tag of any ZeRO stage and rank count (in memory)."""
    from distseg.core import checkpoint
    from distseg.core.safe_load import UnsafeCheckpointError

    try:
        return checkpoint.consolidated_fp32_state(tag_dir)
    except (checkpoint.CheckpointError, UnsafeCheckpointError) as e:
        raise ModelLoadError(str(e)) from e
    except Exception as e:  # DeepSpeed and torch raise assorted errors for damaged shards
        raise ModelLoadError(f"{tag_dir}: cannot consolidate the checkpoint's weights ({type(e).__name__}: {e})") from e


def _load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str, model_name: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelLoadError(f"{where}: the weights do not fit model {model_name!r} built from its config ({first}); "
                             "expected a checkpoint of the same model and size") from e


def read_postprocessing(path: Path) -> Postprocessing | None:
    """The rules of `path` (a postprocessing.json, or a folder holding one), or None when there is none."""
    f = Path(path) if Path(path).suffix == ".json" else Path(path) / POSTPROCESSING_FILE
    if not f.is_file():
        return None
    try:
        return Postprocessing.from_dict(json.loads(f.read_text(encoding="utf-8"))["rules"])
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{f}: unreadable postprocessing rules ({e}); expected the file evaluate.py writes") from e


def resolve_checkpoint(path: Path) -> Path:
    """A run folder -> its best complete checkpoint tag (else the newest complete); a tag folder -> itself."""
    from distseg.core import checkpoint

    if (path / checkpoint.MARKER).is_file() or path.name.startswith(checkpoint.TAG_PREFIX):
        return path
    ckpt_dir = path / "checkpoints"
    complete = checkpoint.complete_checkpoints(ckpt_dir)
    if not complete:
        raise ModelLoadError(f"{path}: no complete checkpoint under {ckpt_dir}; expected a run folder of "
                             "launch/train.py, a checkpoint tag folder, an exported model.pt or a model.onnx")
    best = checkpoint.best_tag(complete)
    return ckpt_dir / (best or complete[-1][1])


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a run folder, a checkpoint tag folder, an exported ``.pt`` (+ ``.yaml`` beside it) or ``.onnx``, local or
    an ``s3://`` URL."""
    from distseg.inference.remote import localize  # s3:// models: fetched into the local cache first

    path = localize(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder; expected a run folder, a checkpoint tag, a .pt or .onnx")
    if path.is_dir():
        return _load_checkpoint(resolve_checkpoint(path), device)
    if path.suffix == ".onnx":
        return _load_onnx(path)
    return _load_weights(path, device)


def _load_checkpoint(tag_dir: Path, device: torch.device | str) -> LoadedModel:
    from distseg.core import checkpoint

    state_file = tag_dir / checkpoint.STATE_FILE
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{state_file}: unreadable trainer state ({e}); expected a checkpoint of launch/train.py"
                             ) from e
    cfg = _config_from_dict(state["config"], str(state_file))
    io = _io_for_checkpoint(state, cfg, tag_dir)
    module = build_inference_model(cfg, io)
    _load_state(module, consolidated_state_dict(tag_dir), str(tag_dir), cfg.model.name)
    run_dir = tag_dir.parent.parent
    return LoadedModel(io, cfg, module.to(device), source=str(tag_dir),
                       step=int(state.get("counters", {}).get("step", 0)) or None,
                       postprocessing=read_postprocessing(run_dir),
                       meta={"val_dice": state.get("val_dice"), "run": str(run_dir), "tag": tag_dir.name})


def _read_sidecar(path: Path) -> dict[str, Any]:
    sidecar = path.with_suffix(".yaml")
    if not sidecar.is_file():
        raise ModelLoadError(f"{path}: no {sidecar.name} beside it; expected the YAML that "
                             "`python -m distseg.inference.export` writes next to the weights (resolved config + "
                             "data contract)")
    try:
        doc = yaml.safe_load(sidecar.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ModelLoadError(f"{sidecar}: not valid YAML ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise ModelLoadError(f"{sidecar}: expected format {EXPORT_FORMAT!r} "
                             "(written by python -m distseg.inference.export)")
    return doc


def _load_weights(path: Path, device: torch.device | str) -> LoadedModel:
    doc = _read_sidecar(path)
    cfg = _config_from_dict(doc["config"], str(path.with_suffix(".yaml")))
    io = ModelIO.from_dict(doc["io"])
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, unsafe pickle: all refused the same way
        raise ModelLoadError(f"{path}: unreadable weights file ({type(e).__name__}: {str(e).splitlines()[0]}); "
                             "expected a state dict saved by python -m distseg.inference.export") from e
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: holds a {type(state).__name__}, expected a state dict")
    module = build_inference_model(cfg, io)
    _load_state(module, state, str(path), cfg.model.name)
    return LoadedModel(io, cfg, module.to(device), source=str(path), step=doc.get("source", {}).get("step"),
                       postprocessing=read_postprocessing(path.parent), meta=dict(doc.get("source", {})))


def _load_onnx(path: Path) -> LoadedModel:
    doc = _read_sidecar(path)
    cfg = _config_from_dict(doc["config"], str(path.with_suffix(".yaml")))
    io = ModelIO.from_dict(doc["io"])
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ModelLoadError(f"{path}: running an ONNX model needs onnxruntime (pip install 'distseg[onnx]')") from e
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as e:
        raise ModelLoadError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {e})") from e
    return LoadedModel(io, cfg, onnx_session=session, source=str(path), step=doc.get("source", {}).get("step"),
                       postprocessing=read_postprocessing(path.parent), meta=dict(doc.get("source", {})))
