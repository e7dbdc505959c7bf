"""Writing predictions: NIfTI label maps in the input's geometry, 2D mask PNGs, overlay PNGs, probability maps.

Every file is written under a temporary name in its final folder and renamed when complete, so a reader (or a
killed run) never sees a partial file; outputs never overwrite an input file (`check_output_dir`).

File names (what `launch/evaluate.py --pred` reads back):
- 3D: ``<case_id>.nii.gz`` (uint8 labels, source convention, source affine + header), ``<case_id>_overlay.png``
  (the axial slice with the largest ground-truth tumour, else the largest predicted one: image | prediction |
  ground truth when the case has a label map, >= 480 px per panel, region legend), ``<case_id>_probabilities.npz``
  with ``--save-probabilities`` (float16 (K, X, Y, Z) in the source grid, plus the region names).
- 2D: ``<case_id>_mask.png`` (the source size, source convention: 0/255 or 0/1), ``<case_id>_overlay.png`` (the
  same panels at >= 480 px), ``<case_id>_probabilities.npz`` (float16 (K, H, W)).
"""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distseg.core.fileio import atomic_write, inside
from distseg.core.overlay import overlay_figure
from distseg.data.geometry import paste_to_source
from distseg.data.labels import BINARY_REGIONS, BRATS_REGIONS
from distseg.data.store import CaseArrays
from distseg.inference.predictor import Prediction

logger = logging.getLogger(__name__)

OVERLAY_CHANNEL = {"brats3d": "flair"}
"""Background channel of 3D overlays (FLAIR shows oedema and tumour best); 2D overlays use the image itself."""


class OutputError(Exception):
    """An output cannot be written (the message names the path and what was expected)."""


def check_output_dir(out_dir: Path, inputs: Sequence[Path] = ()) -> None:
    """Create `out_dir` if needed and check it is writable and not an input folder; raises OutputError."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create the output folder ({e.strerror}); expected a writable path") from e
    probe = out_dir / f".write-test-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"{out_dir}: output folder is not writable ({e.strerror}); choose another --output") from e
    resolved = out_dir.resolve()
    for src in inputs:
        if str(src).startswith("s3://"):  # an object-store input is never a local folder
            continue
        src = Path(src).resolve()
        folder = src if src.is_dir() else src.parent
        if resolved == folder or folder in resolved.parents:
            raise OutputError(f"{out_dir}: is inside the input folder {folder}; predictions never go into (or "
                              "overwrite) inputs, choose another --output")


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, array: np.ndarray) -> Path:
    """uint8 (H, W) or (H, W, 3) -> PNG, atomically."""
    data = _png_bytes(np.ascontiguousarray(array))
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_nifti(path: Path, labels_xyz: np.ndarray, affine: Sequence[Sequence[float]],
                header_from: Path | None = None) -> Path:
    """uint8 labels in the source grid -> NIfTI with the source affine and, when `header_from` (a source image of
    the case) is readable, its header (qform/sform codes, units, orientation), data type set to uint8."""
    import nibabel as nib

    header = None
    if header_from is not None and Path(header_from).is_file():
        try:
            header = nib.load(str(header_from)).header.copy()
        except Exception as e:  # an unreadable source header only costs the extra header fields
            logger.warning("%s: header not copied (%s); writing affine only", header_from, e)
    img = nib.Nifti1Image(np.asarray(labels_xyz, dtype=np.uint8), np.asarray(affine, dtype=np.float64), header=header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    if header is not None:  # keep the source's qform/sform codes with the (identical) source affine
        img.set_qform(np.asarray(affine), code=int(header["qform_code"]) or 1)
        img.set_sform(np.asarray(affine), code=int(header["sform_code"]) or 1)
    return atomic_write(path, lambda tmp: nib.save(img, str(tmp)))


def _scaled(x: np.ndarray) -> np.ndarray:
    """float (..., H, W) -> [0, 1] by its 0.5-99.5 percentiles (robust to a few bright voxels)."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = np.percentile(x, [0.5, 99.5]) if x.size else (0.0, 1.0)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(x)


def ground_truth_masks(case: CaseArrays, names: Sequence[str], kind: str) -> np.ndarray | None:
    """bool (K, Z, Y, X) masks of the case's own label map for the prediction's outputs `names`, stored frame;
    None for an unlabelled case (or outputs that are neither the store's regions nor one foreground channel)."""
    if case.label is None:
        return None
    regions = BRATS_REGIONS if kind == "brats3d" else BINARY_REGIONS
    label = np.asarray(case.label)
    if list(names) == list(regions):
        return np.stack([np.isin(label, values) for values in regions.values()])
    if len(names) == 1:  # data.target=binary: one channel, every tumour label
        return (label > 0)[None]
    logger.warning("%s: outputs %s are not the %s regions; overlay without ground truth", case.case_id, list(names),
                   kind)
    return None


def overlay_3d(case: CaseArrays, masks: np.ndarray, channels: Sequence[str], kind: str = "brats3d",
               names: Sequence[str] = ("WT", "TC", "ET")) -> np.ndarray:
    """RGB uint8 (H, W, 3) (`distseg.core.overlay.overlay_figure`): one axial slice (stored frame) of the background
    channel (FLAIR for BraTS), the prediction beside the ground truth when the case has one. The slice is the one
    with the largest ground-truth tumour, else the largest predicted tumour. masks bool (K, Z, Y, X)."""
    name = OVERLAY_CHANNEL.get(kind)
    c = list(channels).index(name) if name in channels else 0
    gt = ground_truth_masks(case, names, kind)
    chosen = gt if gt is not None and gt.any() else masks
    area = chosen.any(axis=0).reshape(chosen.shape[1], -1).sum(axis=1)
    z = int(np.argmax(area)) if area.any() else masks.shape[1] // 2
    grey = _scaled(case.normalised()[c, z])
    title = f"{case.case_id}: axial slice {z + 1} of {masks.shape[1]}"
    return overlay_figure(grey, masks[:, z], None if gt is None else gt[:, z], names, title,
                          background_name=channels[c] if c < len(channels) else "image")


def overlay_2d(case: CaseArrays, masks: np.ndarray, names: Sequence[str] = ("tumour",),
               kind: str = "images2d") -> np.ndarray:
    """RGB uint8 (H, W, 3) (`distseg.core.overlay.overlay_figure`): the image at its source size (RGB when it has 3
    channels), the prediction beside the ground truth when the case has one, upscaled to >= 480 px.
    masks bool (K, 1, H', W') in the stored frame."""
    image = case.image[:, 0].astype(np.float32)  # (C, H', W')
    channels = [paste_to_source(image[c][None], case.attrs) for c in range(image.shape[0])]

    def to_source(m: np.ndarray) -> np.ndarray:
        return np.stack([paste_to_source(x.astype(np.uint8), case.attrs) for x in m]).astype(bool)

    background = np.stack([_scaled(ch) for ch in channels], axis=-1) if len(channels) == 3 else _scaled(channels[0])
    gt = ground_truth_masks(case, names, kind)
    return overlay_figure(background, to_source(masks), None if gt is None else to_source(gt), names, case.case_id)


def write_probabilities(path: Path, pred: Prediction, attrs: dict[str, Any]) -> Path:
    """float16 probabilities (K, *source grid) + region names, compressed .npz, atomically."""
    maps = np.stack([paste_to_source(p.astype(np.float32), attrs) for p in pred.probabilities]).astype(np.float16)
    names = np.asarray(pred.output_names)
    return atomic_write(path, lambda tmp: np.savez_compressed(tmp, probabilities=maps, names=names))


def write_prediction(out_dir: Path, case: CaseArrays, pred: Prediction, kind: str, channels: Sequence[str],
                     save_probabilities: bool = False) -> dict[str, Path]:
    """Write every output of one case into `out_dir`; returns {what: path}."""
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    attrs = case.attrs
    if attrs.get("source_ndim") == 2:
        written["mask"] = write_png(inside(out_dir, f"{case.case_id}_mask.png"), pred.labels_source.astype(np.uint8))
        written["overlay"] = write_png(inside(out_dir, f"{case.case_id}_overlay.png"),
                                       overlay_2d(case, pred.masks, pred.output_names, kind))
    else:
        header_from = None
        modalities = attrs.get("source_modalities") or {}
        if attrs.get("source_dir") and modalities:
            first = modalities.get("flair") or next(iter(modalities.values()))
            header_from = Path(attrs["source_dir"]) / first
        written["nifti"] = write_nifti(inside(out_dir, f"{case.case_id}.nii.gz"), pred.labels_source, attrs["affine"],
                                       header_from)
        written["overlay"] = write_png(inside(out_dir, f"{case.case_id}_overlay.png"),
                                       overlay_3d(case, pred.masks, channels, kind, pred.output_names))
    if save_probabilities:
        written["probabilities"] = write_probabilities(inside(out_dir, f"{case.case_id}_probabilities.npz"), pred,
                                                       attrs)
    return written
