"""Training: the DeepSpeed engine and optimizer setup (`engine`, `optim`), the loop (`trainer`, with its counters in
`state`, start-up in `setup` and logging in `progress`), the wall-clock budget (`budget`), elastic resume
(`elastic`), graceful stop (`preemption`), lost-rank detection (`lost_rank`), TensorBoard (`monitor`) and
whole-case validation (`validation`).

Imports: `distseg.core`, `distseg.data`, `distseg.models`, `distseg.inference` (validation scores whole cases with
the predictor's sliding window), `distseg.config`, `losses`, `metrics`; never `distseg.evaluation`, `preprocess` or
Ray. `launch/train.py` is its entry point.
"""
