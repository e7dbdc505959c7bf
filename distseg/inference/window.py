"""Whole-case inference on arrays: Gaussian-weighted sliding window and mirror TTA.

    logits = sliding_window(predict, image, SlidingWindow(window=(128, 128, 128), overlap=0.5, mirror_axes=(0, 1, 2)))
    masks = logits > 0                                # sigmoid(logit) > 0.5, one channel per region
    label = regions_to_labels(masks, {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]})   # (distseg.data.targets)

`predict` is any callable from a window batch (B, C, *window) to logits (B, K, *window) on the same device: a
model, a DeepSpeed engine, an ONNX session wrapper. Nothing here knows about models, stores or `preprocess/`
(MONAI's design); `distseg.inference.predictor` joins them. The same function scores whole cases in training validation
and in `launch/predict.py` / `launch/evaluate.py`, so "best checkpoint" and the reported numbers agree.

Window placement and weighting follow nnU-Net: per axis ``n = ceil((S - W) / (W * (1 - overlap))) + 1`` windows,
evenly spaced from 0 to S - W; each window's logits are weighted by a Gaussian importance map (sigma = 1/8 of the
window, normalised to max 1, computed once per window shape) and the weighted sum is divided by the summed
weights. Cases smaller than the window are zero-padded symmetrically (z-scored background is 0) and cropped back.
Mirror TTA averages the logits of every combination of flips of `mirror_axes` (2^n forwards per window batch).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from distseg.data.resample import downsample_image, upsample_logits

Predict = Callable[[torch.Tensor], torch.Tensor]
"""(B, C, *window) float -> (B, K, *window) logits (a list, as deep supervision returns in training mode, is
reduced to its first, full-resolution element)."""


@dataclass(frozen=True)
class SlidingWindow:
    """How a whole case is tiled and combined."""

    window: tuple[int, ...]
    """Window size per spatial axis (the training patch; 1 along Z for 2D models run over axial slices)."""
    overlap: float = 0.5
    """Fraction of a window shared with its neighbour along each axis (nnU-Net and MONAI default 0.5)."""
    window_batch: int = 4
    """Windows per forward call."""
    importance: str = "gaussian"
    """"gaussian" (nnU-Net, MONAI mode="gaussian") or "constant" (plain average)."""
    sigma_scale: float = 0.125
    """Gaussian sigma as a fraction of the window size per axis."""
    mirror_axes: tuple[int, ...] = ()
    """Spatial axes (0-based over the window dims) flipped for test-time augmentation; () = no TTA."""

    def __post_init__(self) -> None:
        if not self.window or any(int(w) < 1 for w in self.window):
            raise ValueError(f"sliding window: window must be positive sizes, got {self.window}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"sliding window: overlap must be in [0, 1), got {self.overlap}")
        if self.window_batch < 1:
            raise ValueError(f"sliding window: window_batch must be >= 1, got {self.window_batch}")
        if self.importance not in ("gaussian", "constant"):
            raise ValueError(f"sliding window: importance must be 'gaussian' or 'constant', got {self.importance!r}")
        if any(not 0 <= a < len(self.window) for a in self.mirror_axes):
            raise ValueError(f"sliding window: mirror_axes {self.mirror_axes} out of range for a "
                             f"{len(self.window)}-D window")

    @property
    def mirror_sets(self) -> list[tuple[int, ...]]:
        """Every subset of `mirror_axes` (the empty one first): one forward per subset."""
        axes = tuple(sorted(set(self.mirror_axes)))
        return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


# --------------------------------------------------------------------------------------------- placement
def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Starts of the windows along one axis of length `size` (>= window): evenly spaced from 0 to size - window."""
    if size <= window:
        return [0]
    target_step = max(window * (1.0 - overlap), 1.0)  # never below one voxel (a 1-slice window steps by 1)
    n = math.ceil((size - window) / target_step) + 1
    step = (size - window) / (n - 1)
    return [int(round(i * step)) for i in range(n)]


def window_grid(shape: Sequence[int], sw: SlidingWindow) -> list[tuple[int, ...]]:
    """Every window start (one per spatial axis) over a case of spatial `shape` (after padding to the window)."""
    axes = [window_starts(max(int(s), int(w)), int(w), sw.overlap) for s, w in zip(shape, sw.window, strict=True)]
    return list(itertools.product(*axes))


def forward_calls(shape: Sequence[int], sw: SlidingWindow) -> int:
    """Forward calls `sliding_window` makes for a case of spatial `shape` (window batches x mirror subsets).

    Known from metadata alone, so ranks can agree on a symmetric number of forwards (ZeRO-3) without talking.
    """
    return math.ceil(len(window_grid(shape, sw)) / sw.window_batch) * len(sw.mirror_sets)


@functools.lru_cache(maxsize=16)
def _importance_cpu(window: tuple[int, ...], mode: str, sigma_scale: float) -> torch.Tensor:
    if mode == "constant":
        return torch.ones(window, dtype=torch.float32)
    g = torch.ones((), dtype=torch.float64)
    for n in window:  # separable: the product of 1D Gaussians centred on the window
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2.0
        sigma = max(n * sigma_scale, 1e-6)
        g = g.unsqueeze(-1) * torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.max()
    # Far corners underflow towards 0: keep every weight positive so no voxel is left with a zero weight sum.
    g = g.clamp_min(float(g[g > 0].min()))
    return g.to(torch.float32)


def importance_map(sw: SlidingWindow, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 (*window) weights, max 1 (computed once per window shape and mode, then cached)."""
    return _importance_cpu(tuple(int(w) for w in sw.window), sw.importance, float(sw.sigma_scale)).to(device)


# --------------------------------------------------------------------------------------------- the window loop
def _first(out: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _centred_pad(image: torch.Tensor, window: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad each spatial axis smaller than the window symmetrically; return the padded image and the slices
    that recover the original region."""
    spatial = image.shape[1:]
    lo = [max(int(w) - int(s), 0) // 2 for s, w in zip(spatial, window, strict=True)]
    hi = [max(int(w) - int(s), 0) - a for s, w, a in zip(spatial, window, lo, strict=True)]
    if not any(lo) and not any(hi):
        return image, tuple(slice(None) for _ in spatial)
    pads: list[int] = []
    for a, b in zip(reversed(lo), reversed(hi), strict=True):
        pads += [a, b]
    region = tuple(slice(a, a + int(s)) for a, s in zip(lo, spatial, strict=True))
    return F.pad(image, pads), region


@torch.no_grad()  # not inference_mode: a ZeRO-3 engine's gathered weights must stay usable for training
def sliding_window(
    predict: Predict,
    image: torch.Tensor | np.ndarray,
    sw: SlidingWindow,
    device: torch.device | str | None = None,
    accumulate_device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logits for a whole case: image (C, *S) -> float32 (K, *S) on `accumulate_device`.

    The image is moved to `device` (default: the image's device) once, and windows are cut there: cutting strided
    3D windows on the host and copying each batch over was 1.8x slower than MONAI on an H100. The weighted sums
    accumulate on `accumulate_device` (default: `device`; pass "cpu" when a large case's (K, *S) accumulator does
    not fit next to the model, the image then stays where it is and windows travel one batch at a time).
    `autocast_dtype` (e.g. torch.bfloat16) runs each forward under autocast on `device`; accumulation is always
    float32.
    """
    image = torch.as_tensor(image)
    if image.dim() != len(sw.window) + 1:
        raise ValueError(f"sliding window: image {tuple(image.shape)} must be (C, *S) with {len(sw.window)} spatial "
                         f"axes to match window {sw.window}")
    device = torch.device(device) if device is not None else image.device
    acc_device = torch.device(accumulate_device) if accumulate_device is not None else device
    if acc_device == device:
        image = image.to(device, non_blocking=True)
    padded, region = _centred_pad(image, sw.window)
    spatial = tuple(padded.shape[1:])
    starts = window_grid(spatial, sw)
    weight = importance_map(sw, acc_device)
    window = tuple(int(w) for w in sw.window)
    out: torch.Tensor | None = None
    norm = torch.zeros(spatial, dtype=torch.float32, device=acc_device)
    flip_sets = sw.mirror_sets
    for b0 in range(0, len(starts), sw.window_batch):
        batch_starts = starts[b0 : b0 + sw.window_batch]
        boxes = [tuple(slice(s, s + w) for s, w in zip(st, window, strict=True)) for st in batch_starts]
        x = torch.stack([padded[(slice(None), *box)] for box in boxes]).to(device, non_blocking=True)
        logits = None
        for flips in flip_sets:
            dims = [2 + a for a in flips]
            xi = torch.flip(x, dims) if dims else x
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                y = _first(predict(xi))
            y = y.float()
            y = torch.flip(y, dims) if dims else y
            logits = y if logits is None else logits + y
        assert logits is not None
        if len(flip_sets) > 1:
            logits = logits / len(flip_sets)
        logits = logits.to(acc_device)
        if out is None:
            out = torch.zeros((logits.shape[1], *spatial), dtype=torch.float32, device=acc_device)
        for k, box in enumerate(boxes):
            out[(slice(None), *box)].addcmul_(logits[k], weight)  # in place: no (K, *window) temporary
            norm[box] += weight
    assert out is not None
    out /= norm
    return out[(slice(None), *region)]


def window_for(mode: str, patch_size: Sequence[int]) -> tuple[int, ...]:
    """The sliding window over a stored case (Z, Y, X) for a model trained in data mode `mode`: the 3D patch for
    "patch3d", (1, Y, X) for the 2D modes (slice2d / image2d run the 2D model over axial slices)."""
    return tuple(int(p) for p in patch_size) if mode == "patch3d" else (1, *(int(p) for p in patch_size))


def window_predictor(net: Callable[[torch.Tensor], object], mode: str,
                     input_dtype: torch.dtype | None = None) -> Predict:
    """Wrap a model (module, DeepSpeed engine, ONNX runner) for `sliding_window`: (B, C, *window) -> float logits.

    2D models (slice2d / image2d) see windows (B, C, 1, Y, X) as (B, C, Y, X). `input_dtype` casts each window
    first (a DeepSpeed engine holds bf16/fp16 weights and takes inputs of that dtype); deep-supervision lists give
    their full-resolution head.
    """
    def predict(x: torch.Tensor) -> torch.Tensor:
        if input_dtype is not None:
            x = x.to(input_dtype)
        y = net(x if mode == "patch3d" else x[:, :, 0])
        y = _first(y).float()  # type: ignore[arg-type]
        return y if mode == "patch3d" else y[:, :, None]

    return predict


def case_logits(predict: Predict, image: torch.Tensor | np.ndarray, sw: SlidingWindow, downsample: int = 1,
                spatial_dims: int = 3, device: torch.device | str | None = None,
                accumulate_device: torch.device | str | None = None,
                autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits of a whole case at its own resolution: image (C, Z, Y, X) -> float32 (K, Z, Y, X).

    With `downsample` f > 1 (a model trained at 1/f resolution, nnU-Net's "lowres" idea) the case is average-pooled
    by f, tiled at that resolution, and the logits are interpolated back (trilinear; bilinear in-plane for 2D
    models) and cropped to the case, so thresholds and labels are decided on the original grid.
    """
    image = torch.as_tensor(image)
    if downsample == 1:
        return sliding_window(predict, image, sw, device, accumulate_device, autocast_dtype)
    dev = torch.device(device) if device is not None else image.device
    low = sliding_window(predict, downsample_image(image.to(dev), downsample, spatial_dims), sw, dev,
                         accumulate_device, autocast_dtype)
    return upsample_logits(low[None], downsample, spatial_dims, image.shape[1:])[0]
