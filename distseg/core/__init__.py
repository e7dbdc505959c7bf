"""The floor every stage stands on: process groups and devices (`dist`), atomic file writes (`fileio`), DeepSpeed
checkpoints with completion markers (`checkpoint`), stop-signal plumbing (`signals`), segmentation overlays
(`overlay`), the exit-status table of every command (`exit_codes`), reading DeepSpeed files without running pickled
code (`safe_load`).

Imports: third-party libraries and other `distseg.core` modules only; never `distseg.data`, `models`, `train`,
`inference` or `evaluation`, and never `preprocess` or Ray.
"""
