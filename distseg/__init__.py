"""distseg: brain-tumour segmentation training at cluster scale (the library; never imports `preprocess` or Ray)."""

__version__ = "0.1.0"
