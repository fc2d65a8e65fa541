"""Where local copies of the standard data sets live, for machines without the hub."""
from __future__ import annotations

import os
from pathlib import Path

LOCAL_FILES = {
    # The raw wikitext-2 train split is not part of the offline copy; its validation split
    # (tokenized text, never overlapping test) is the offline calibration source.
    ("wikitext2", "calibration"): "wikitext/wikitext-2-v1/validation-00000-of-00001.parquet",
    ("wikitext2", "test"): "wikitext/wikitext-2-raw-v1/test-00000-of-00001.parquet",
}


def local_data_dir() -> Path | None:
    """``$LLMBIN_DATA``: a folder of local copies laid out as ``LOCAL_FILES`` says, or None."""
    env = os.environ.get("LLMBIN_DATA")
    return Path(env) if env else None


def local_file(dataset: str, purpose: str) -> Path | None:
    root = local_data_dir()
    rel = LOCAL_FILES.get((dataset, purpose))
    if root is None or rel is None:
        return None
    path = root / rel
    return path if path.is_file() else None
