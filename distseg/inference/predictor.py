"""A trained model ready to segment whole cases: loading (run, checkpoint tag, exported weights, ONNX) + prediction.

    model = load_model("outputs/runs/brats_unet3d")           # best checkpoint, else the newest complete one
    predictor = Predictor(model, overlap=0.5, tta=True)
    result = predictor.predict(case)                            # case: distseg.data.store.CaseArrays
    result.labels_source                                        # source grid + label convention, ready for NIfTI

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

import numpy as np
import torch
import yaml

from distseg.config import ExperimentConfig, from_dict
from distseg.data.geometry import paste_to_source
from distseg.data.labels import to_source_convention
from distseg.data.layout import StoreError
from distseg.data.store import CaseArrays, Store
from distseg.data.targets import num_targets, regions_to_labels, target_names
from distseg.inference.postprocess import Postprocessing, postprocess
from distseg.inference.window import SlidingWindow, case_logits, window_for, window_predictor

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
        if self.target == "binary":
            return {"foreground": [1]}
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

    try:
        return checkpoint.consolidated_fp32_state(tag_dir)
    except checkpoint.CheckpointError as e:
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


def _read_postprocessing(folder: Path) -> Postprocessing | None:
    f = folder / POSTPROCESSING_FILE
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
    """Load a run folder, a checkpoint tag folder, an exported ``.pt`` (+ ``.yaml`` beside it) or ``.onnx``."""
    path = Path(path).expanduser()
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
                       postprocessing=_read_postprocessing(run_dir),
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
                       postprocessing=_read_postprocessing(path.parent), meta=dict(doc.get("source", {})))


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
                       postprocessing=_read_postprocessing(path.parent), meta=dict(doc.get("source", {})))


# ------------------------------------------------------------------------------------------------ prediction
@dataclass
class Prediction:
    """One case's prediction. Stored-frame arrays are (Z, Y, X) over the cropped case; source arrays are in the
    input file's own grid and axis order (NIfTI (X, Y, Z), 2D (H, W))."""

    case_id: str
    probabilities: np.ndarray
    """float32 (K, Z, Y, X) sigmoid probabilities, stored frame."""
    masks: np.ndarray
    """bool (K, Z, Y, X) region masks after thresholding (and postprocessing), stored frame."""
    labels: np.ndarray
    """uint8 (Z, Y, X) canonical labels, stored frame."""
    labels_source: np.ndarray
    """uint8 labels in the source grid and the source label convention."""
    output_names: list[str]


class Predictor:
    """Sliding-window prediction of whole cases with a `LoadedModel` (one code path for store and raw cases)."""

    def __init__(self, model: LoadedModel, overlap: float = 0.5, tta: bool = False, window_batch: int = 4,
                 device: torch.device | str = "cpu", precision: str = "auto", use_postprocessing: bool = False,
                 accumulate_device: torch.device | str | None = None) -> None:
        self.model = model
        self.io = model.io
        self.device = torch.device(device)
        mirror = (0, 1, 2) if self.io.mode == "patch3d" else (1, 2)  # 2D models: in-plane flips only
        self.sw = SlidingWindow(window=self.io.window(), overlap=overlap, window_batch=window_batch,
                                mirror_axes=mirror if tta else ())
        self.autocast = self._autocast_dtype(precision)
        self.accumulate_device = accumulate_device
        if use_postprocessing and model.postprocessing is None:
            raise ModelLoadError(f"{model.source}: --postprocess asked for, but no {POSTPROCESSING_FILE} was chosen "
                                 "for this model; run `launch/evaluate.py --model ...` on validation cases first")
        self.postprocessing = model.postprocessing if use_postprocessing else None

    def _autocast_dtype(self, precision: str) -> torch.dtype | None:
        if precision == "auto":  # reduced precision where the accelerator runs it fast; fp32 on CPU
            trained = self.model.config.deepspeed.precision
            precision = trained if self.device.type == "cuda" and trained in ("bf16", "fp16") else "fp32"
        table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        if precision not in table:
            raise ValueError(f"precision: expected auto, fp32, bf16 or fp16, got {precision!r}")
        return table[precision]

    def _forward(self) -> Any:
        if self.model.module is not None:
            return self.model.module
        session = self.model.onnx_session
        name = session.get_inputs()[0].name

        def run(x: torch.Tensor) -> torch.Tensor:
            y = session.run(None, {name: x.detach().float().cpu().numpy()})[0]
            return torch.from_numpy(y).to(x.device)

        return run

    def logits(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalised image (C, Z, Y, X) -> float32 logits (K, Z, Y, X) on the accumulation device."""
        if image.shape[0] != self.io.in_channels:
            raise ValueError(f"image has {image.shape[0]} channels; the model expects {self.io.in_channels} "
                             f"({', '.join(self.io.channels)})")
        predict = window_predictor(self._forward(), self.io.mode)
        # inference_mode (a plain module here, never a training engine): no autograd bookkeeping at all, as MONAI's
        # inferers are used; the result is cloned outside it so callers get an ordinary tensor.
        with torch.inference_mode():
            out = case_logits(predict, torch.as_tensor(image), self.sw, self.io.downsample,
                              3 if self.io.mode == "patch3d" else 2, device=self.device,
                              accumulate_device=self.accumulate_device, autocast_dtype=self.autocast)
        return out.clone()

    def check_case(self, case: CaseArrays) -> None:
        """Refuse a case that does not fit the model (channels, 2D vs 3D), naming the case."""
        n = case.image.shape[0]
        if n != self.io.in_channels:
            raise ValueError(f"{case.case_id}: {n} input channels but the model was trained on "
                             f"{self.io.in_channels} ({', '.join(self.io.channels)})")
        is2d = case.attrs.get("source_ndim") == 2
        if is2d != (self.io.kind == "images2d"):
            want = "2D images" if self.io.kind == "images2d" else "3D BraTS volumes"
            raise ValueError(f"{case.case_id}: the model was trained on {want}; got a "
                             f"{'2D image' if is2d else '3D volume'}")

    def predict(self, case: CaseArrays, keep_probabilities: bool = True) -> Prediction:
        """Segment one whole case (stored frame in, stored frame + source grid out)."""
        self.check_case(case)
        logits = self.logits(case.normalised())
        probs = torch.sigmoid(logits).cpu().numpy()
        masks = probs > 0.5
        regions = self.io.decode_regions
        spacing = case.attrs.get("spacing")
        if self.postprocessing is not None:
            masks = postprocess(masks, regions, self.postprocessing, spacing)
        labels = regions_to_labels(masks, regions)
        source = to_source_convention(paste_to_source(labels, case.attrs), case.attrs["label_convention"])
        return Prediction(case.case_id, probs if keep_probabilities else np.zeros((0,)), masks, labels, source,
                          self.io.output_names)

