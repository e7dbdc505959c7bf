"""The store's on-disk contract shared by the writer (`preprocess`) and every reader: layout names, the format
version, and the error type readers raise. See `distseg.data.store` for the whole layout."""

from __future__ import annotations

import json
import re
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

CASE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
"""What a stored case id may be: a safe single folder (or object key) name."""


def validate_case_id(case_id: str) -> None:
    """Raise ValueError unless `case_id` is a safe single path component: letters, digits, '.', '_' or '-',
    starting with a letter or digit, no '..', at most 200 characters (nothing else, not even a final newline)."""
    if not isinstance(case_id, str) or not CASE_ID_PATTERN.fullmatch(case_id) or ".." in case_id:
        raise ValueError(
            f"case id {case_id!r} is not a safe folder name: expected letters, digits, '.', '_' or '-', "
            "starting with a letter or digit and no '..'"
        )



def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
