"""Data: the preprocessed-dataset store contract (`store`), plus datasets, sampling and augmentation built on it."""

from distseg.data.store import (
    FORMAT_VERSION,
    CaseInfo,
    Store,
    StoreError,
    restore_to_source_geometry,
    to_source_convention,
)

__all__ = ["FORMAT_VERSION", "CaseInfo", "Store", "StoreError", "restore_to_source_geometry", "to_source_convention"]
