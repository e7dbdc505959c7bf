"""Data: the preprocessed-dataset store contract shared with `preprocess` (`layout`, `store`, `chunks`, `index`,
`normalise`, `labels`, `geometry`), and the training side built on it (`config`, `sampling`, `datasets`, `loader`,
`augment`, `targets`, `resample`).

Imports: `distseg.core` and other `distseg.data` modules only; never `models`, `train`, `inference`, `evaluation`,
`preprocess` or Ray.
"""
