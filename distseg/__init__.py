"""distseg: brain-tumour segmentation training at cluster scale (the library; never imports `preprocess` or Ray).

Rooms, lowest first (each imports only from rooms below it):
`core` (dist, fileio, checkpoint, signals, overlay, exit_codes) < `data`, `models`, and the shared modules beside
them (`typed_config`, `config_files`, `config`, `losses`, `metrics`) < `inference` < `train` < `evaluation`.
See docs/architecture.md.
"""

__version__ = "0.1.0"
