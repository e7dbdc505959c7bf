"""Inference: the Gaussian sliding window and mirror TTA on arrays (`window`), postprocessing (per-region thresholds,
connected components: `postprocess`), models loaded from runs, checkpoints or exports and run on cases (`predictor`),
NIfTI/PNG outputs in the source geometry (`outputs`), and the fp32/ONNX export (`export`).

Imports: `distseg.core`, `distseg.data`, `distseg.models`, `distseg.config`; never `distseg.train`,
`distseg.evaluation`, `preprocess` or Ray. `launch/predict.py` joins it to the converter for raw scans.
"""
