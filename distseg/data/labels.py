"""Label conventions: the canonical stored labels, the BraTS and binary region definitions, and the mapping back
to each source convention (BraTS 2018-2021 write enhancing tumour as 4, BraTS 2023+ as 3)."""

from __future__ import annotations

import numpy as np

from distseg.data.layout import StoreError

BRATS_CHANNELS = ["t1", "t1ce", "t2", "flair"]
BRATS_LABEL_VALUES = {"0": "background", "1": "necrosis", "2": "edema", "3": "enhancing"}
BRATS_REGIONS = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
BINARY_LABEL_VALUES = {"0": "background", "1": "tumour"}
BINARY_REGIONS = {"tumour": [1]}

# Stored (canonical) label -> source label, per source convention; used to write predictions back.
LABEL_CONVENTIONS: dict[str, dict[int, int]] = {
    "brats2018": {0: 0, 1: 1, 2: 2, 3: 4},  # BraTS 2018-2021: enhancing tumour is 4
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 3},  # BraTS 2023+: enhancing tumour is 3
    "binary255": {0: 0, 1: 255},
    "binary01": {0: 0, 1: 1},
}


def to_source_convention(label: np.ndarray, convention: str) -> np.ndarray:
    """Map canonical stored labels back to a source convention (e.g. brats2018: 3 -> 4). Same shape, uint8."""
    if convention not in LABEL_CONVENTIONS:
        raise StoreError(f"unknown label convention {convention!r}; expected one of {sorted(LABEL_CONVENTIONS)}")
    lut = np.zeros(256, dtype=np.uint8)
    for stored, source in LABEL_CONVENTIONS[convention].items():
        lut[stored] = source
    return lut[np.asarray(label, dtype=np.uint8)]
