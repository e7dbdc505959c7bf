"""Whole-case prediction with a loaded model or an ensemble (`Predictor`).

    model = load_model("outputs/runs/brats_unet3d")            # distseg.inference.loading: best checkpoint
    predictor = Predictor(model, overlap=0.5, tta=True)         # or Predictor(load_models([cv_folder]), ...)
    result = predictor.predict(case)                            # case: distseg.data.store.CaseArrays
    result.labels_source                                        # source grid + label convention, ready for NIfTI
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distseg.data.geometry import paste_to_source
from distseg.data.labels import to_source_convention
from distseg.data.store import CaseArrays
from distseg.data.targets import regions_to_labels
from distseg.inference.ensemble import ModelSet
from distseg.inference.loading import POSTPROCESSING_FILE, LoadedModel, ModelIO, ModelLoadError
from distseg.inference.postprocess import (
    Postprocessing,
    binarise,
    component_spacing,
    postprocess,
    postprocess_stack,
)
from distseg.inference.window import SlidingWindow, case_logits, window_predictor
from distseg.models.memory_format import channels_last_wanted, use_channels_last

logger = logging.getLogger(__name__)


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
    """Sliding-window prediction of whole cases with a `LoadedModel` or an ensemble of them (`ModelSet`): one code
    path for store and raw cases.

    An ensemble's probabilities are the mean of its members' sigmoid probabilities. Members that share the window,
    mode and resolution run window by window (one pass over the windows, every member on each window batch, each
    with its own accumulator); others run case by case (each member's own sliding window, then the mean). Mirror
    TTA averages each member's logits over the flips, as for a single model.
    """

    def __init__(self, model: LoadedModel | ModelSet, overlap: float = 0.5, tta: bool = False, window_batch: int = 4,
                 device: torch.device | str = "cpu", precision: str = "auto", use_postprocessing: bool = False,
                 accumulate_device: torch.device | str | None = None) -> None:
        models = model if isinstance(model, ModelSet) else ModelSet([model], model.postprocessing, model.source)
        self.models = models
        self.model = models.members[0]
        self.io = self.model.io
        self.device = torch.device(device)
        for member in models.members:  # model.channels_last of each member's run (auto: 3D models on the CPU)
            if member.module is not None and channels_last_wanted(member.config.model.channels_last,
                                                                  3 if member.io.mode == "patch3d" else 2,
                                                                  self.device.type):
                use_channels_last(member.module)
        mirror = (0, 1, 2) if self.io.mode == "patch3d" else (1, 2)  # 2D models: in-plane flips only
        self.sw = SlidingWindow(window=self.io.window(), overlap=overlap, window_batch=window_batch,
                                mirror_axes=mirror if tta else ())
        self.autocast = self._autocast_dtype(precision)
        self.accumulate_device = accumulate_device
        if use_postprocessing and models.postprocessing is None:
            raise ModelLoadError(
                f"{models.source}: --postprocess asked for, but no {POSTPROCESSING_FILE} was chosen for this "
                f"{'ensemble' if len(models.members) > 1 else 'model'}; choose it on validation cases first "
                "(`launch/crossval.py` for a CV folder, `launch/evaluate.py --model ... --choose-postprocessing`)")
        self.postprocessing = models.postprocessing if use_postprocessing else None

    def _autocast_dtype(self, precision: str) -> torch.dtype | None:
        if precision == "auto":  # reduced precision where the accelerator runs it fast (first member's); fp32 on CPU
            trained = self.model.config.deepspeed.precision
            precision = trained if self.device.type == "cuda" and trained in ("bf16", "fp16") else "fp32"
        table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        if precision not in table:
            raise ValueError(f"precision: expected auto, fp32, bf16 or fp16, got {precision!r}")
        return table[precision]

    @staticmethod
    def _forward(model: LoadedModel) -> Any:
        if model.module is not None:
            return model.module
        session = model.onnx_session
        name = session.get_inputs()[0].name

        def run(x: torch.Tensor) -> torch.Tensor:
            y = session.run(None, {name: x.detach().float().cpu().numpy()})[0]
            return torch.from_numpy(y).to(x.device)

        return run

    def _case_map(self, predict: Any, io: ModelIO, image: torch.Tensor) -> torch.Tensor:
        # inference_mode (plain modules here, never a training engine): no autograd bookkeeping at all, as MONAI's
        # inferers are used; the result is cloned outside it so callers get an ordinary tensor.
        with torch.inference_mode():
            out = case_logits(predict, image, self.sw if io is self.io else self._window_of(io), io.downsample,
                              3 if io.mode == "patch3d" else 2, device=self.device,
                              accumulate_device=self.accumulate_device, autocast_dtype=self.autocast)
        return out.clone()

    def _window_of(self, io: ModelIO) -> SlidingWindow:
        return SlidingWindow(window=io.window(), overlap=self.sw.overlap, window_batch=self.sw.window_batch,
                             mirror_axes=self.sw.mirror_axes)

    def logits(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalised image (C, Z, Y, X) -> float32 logits (K, Z, Y, X) of the (first) model on the accumulation
        device."""
        self._check_channels(image)
        predict = window_predictor(self._forward(self.model), self.io.mode)
        return self._case_map(predict, self.io, torch.as_tensor(image))

    def probabilities(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalised image (C, Z, Y, X) -> float32 sigmoid probabilities (K, Z, Y, X), averaged over the members
        of an ensemble (see the class docstring), on the accumulation device."""
        self._check_channels(image)
        members = self.models.members
        if len(members) == 1:
            return torch.sigmoid(self.logits(image))
        image = torch.as_tensor(image)
        if self.models.shares_window():
            nets = [window_predictor(self._forward(m), self.io.mode) for m in members]

            def stacked(x: torch.Tensor) -> torch.Tensor:  # (B, C, *window) -> (B, M * K, *window)
                return torch.cat([net(x) for net in nets], dim=1)

            # One pass over the windows (each window batch cut once, through every member); each member's logits
            # accumulate in their own channels exactly as they would alone, so the result is the mean of what the
            # members predict alone. Memory: M accumulators, i.e. M x one model's.
            logits = self._case_map(stacked, self.io, image)
            k = self.io.out_channels
            return torch.sigmoid(logits.view(len(members), k, *logits.shape[1:])).mean(0)
        total = None
        for m in members:
            p = torch.sigmoid(self._case_map(window_predictor(self._forward(m), m.io.mode), m.io, image))
            total = p if total is None else total.add_(p)
        assert total is not None
        return total / len(members)

    def _check_channels(self, image: np.ndarray | torch.Tensor) -> None:
        if image.shape[0] != self.io.in_channels:
            raise ValueError(f"image has {image.shape[0]} channels; the model expects {self.io.in_channels} "
                             f"({', '.join(self.io.channels)})")

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
        """Segment one whole case (stored frame in, stored frame + source grid out); a "subject" postprocessing
        rule acts on this case alone (`predict_stack` gives it the subject's other slices)."""
        return self.predict_stack([case], [None], keep_probabilities)[0]

    def case_probabilities(self, case: CaseArrays) -> np.ndarray:
        """One case's stored-frame probabilities float32 (K, Z, Y, X), after checking that it fits the model."""
        self.check_case(case)
        return self.probabilities(case.normalised()).cpu().numpy()

    def predict_stack(self, cases: Sequence[CaseArrays], positions: Sequence[int | None],
                      keep_probabilities: bool = True) -> list[Prediction]:
        """Segment the cases of one stack (`distseg.inference.postprocess.group_by_stack`: a subject's 2D slices,
        `positions` their slice positions) so that "subject" postprocessing rules see them together."""
        return self.decode_stack(cases, [self.case_probabilities(c) for c in cases], positions, keep_probabilities)

    def decode_stack(self, cases: Sequence[CaseArrays], probabilities: Sequence[np.ndarray],
                     positions: Sequence[int | None], keep_probabilities: bool = True) -> list[Prediction]:
        """The stack's probabilities (each (K, Z, Y, X)) -> predictions: thresholded, postprocessed together
        (`postprocess_stack`), decoded per case (`decode`)."""
        decoded = decode_stack(probabilities, [c.attrs for c in cases], positions, self.io, self.postprocessing,
                               what=cases[0].case_id)
        return [Prediction(case.case_id, probs if keep_probabilities else np.zeros((0,)), m, labels, source,
                           self.io.output_names)
                for case, probs, (m, labels, source) in zip(cases, probabilities, decoded, strict=True)]


def decode_stack(probabilities: Sequence[np.ndarray], attrs: Sequence[dict[str, Any]],
                 positions: Sequence[int | None], io: ModelIO, pp: Postprocessing | None = None,
                 what: str = "stack") -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One stack's probabilities (each (K, Z, Y, X); `group_by_stack`) -> `decode`'s (masks, labels, source labels)
    per case: thresholded and postprocessed together (`postprocess_stack`), then decoded case by case. Shared by
    prediction and by evaluation's postprocessed scores."""
    regions = io.decode_regions
    masks = [binarise(p, regions, pp) for p in probabilities]
    if pp is not None:
        masks = postprocess_stack(masks, positions, regions, pp, component_spacing(attrs[0]), what=what)
    return [decode(p, io, a, pp, masks=m) for p, a, m in zip(probabilities, attrs, masks, strict=True)]


def decode(probabilities: np.ndarray, io: ModelIO, attrs: dict[str, Any], pp: Postprocessing | None = None,
           masks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stored-frame probabilities float (K, Z, Y, X) -> (region masks bool (K, Z, Y, X) after `pp`, canonical labels
    uint8 (Z, Y, X), labels in the source grid and convention).

    `pp`: its per-region thresholds (`binarise`) and component rules. `masks`: the region masks already thresholded
    and postprocessed by the caller (`postprocess_stack`: rules that see a subject's other slices); `pp`'s rules are
    then not applied again (its thresholds still decide a resized case's resampled probabilities).

    The one decoding used by prediction and evaluation. A binary model on a multi-label store (BraTS with
    `data.target: binary`) has no label of its own: its source output is the foreground mask as 0/1. A 2D case
    resized on conversion is brought back to its source size by resampling the probabilities (bilinear; pixels that
    `pp` removed set to 0 first) and thresholding there, never by resizing hard labels.
    """
    regions = io.decode_regions
    # Hierarchical decoding: nested regions are clipped to their containers before labels are painted. Painting
    # the raw channels would let a core voxel outside the whole tumour count as tumour (WT = union of the
    # channels); measured on out-of-fold predictions of 16 real BraTS cases (brats_budget_cv, .notes/crossval.md):
    # Dice WT 0.418 -> 0.737, TC 0.176 -> 0.446, ET unchanged.
    if masks is None:
        masks = binarise(probabilities, regions, pp)
        if pp is not None:
            masks = postprocess(masks, regions, pp, component_spacing(attrs))
    binary_multilabel = io.target == "binary" and len(next(iter(regions.values()))) > 1
    labels = masks[0].astype(np.uint8) if binary_multilabel else regions_to_labels(masks, regions)
    if attrs.get("resized_from") is not None:
        t = (pp or Postprocessing()).thresholds(regions)
        removed = (probabilities > t.reshape(-1, 1, 1, 1)) & ~masks  # what `pp` took away stays away
        kept = np.where(removed, 0.0, probabilities).astype(np.float32)
        src_probs = np.stack([paste_to_source(p, attrs) for p in kept])  # (K, *source grid)
        src_masks = src_probs > t.reshape(-1, *([1] * (src_probs.ndim - 1)))
        src = src_masks[0].astype(np.uint8) if binary_multilabel else regions_to_labels(src_masks, regions)
    else:
        src = paste_to_source(labels, attrs)
    if not binary_multilabel:
        src = to_source_convention(src, attrs["label_convention"])
    return masks, labels, src

