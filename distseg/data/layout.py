"""The store's on-disk contract shared by the writer (`preprocess`) and every reader: layout names, the format
version, and the error type readers raise. See `distseg.data.store` for the whole layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMAT_VERSION: int = 1
"""Bump when the on-disk layout or attribute meaning changes; readers refuse other versions."""

CASES_GROUP = "cases"
TMP_DIR = ".tmp"
INDEX_FILE = "index.json"
PREVIOUS_INDEX = ".index.json.previous"
"""Where `distseg.data.index.remove_index` parks the index during a preprocessing run (readers never open it)."""
OMITTED_CHUNKS = "omitted_chunks"
"""Array attribute: chunk indices the writer left out because they were all fill value. With it, any other
missing chunk file is damage (an error); arrays from older writers lack it and read missing chunks as fill."""


TEST_FOLD = -1
"""The `fold` of a test-split case: it belongs to no cross-validation fold (its `split` attr is "test")."""
SPLITS = ("train", "test")
"""`split` case attr: "train" cases are the cross-validation pool (training and validation folds); "test" cases were
set aside at preprocessing and are never trained on, validated on or used for any choice. Stores written before
test splits have no `split` attr: every case is "train"."""


class StoreError(Exception):
    """A store, case or attribute is missing or not what this reader expects (the message names which)."""


def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
