"""Text for calibration and evaluation: the standard data sets (hub or local copy) and local files."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import LlmbinError, missing_path
from .paths import LOCAL_FILES, local_file

DATASETS = ("wikitext2", "c4", "ptb")


def read_text_file(path: str | Path) -> list[str]:
    """Rows of text from a parquet file (``text`` column), a jsonl file (``text`` field) or a txt file
    (UTF-8). A file with no text at all (every row empty or null) is refused."""
    path = Path(path)
    problem = missing_path(path)
    if problem:
        raise LlmbinError(f"data file {path} {problem}; pass an existing .parquet, .jsonl or .txt file")
    try:
        rows = _read_rows(path)
    except UnicodeDecodeError as exc:
        raise LlmbinError(f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded); convert it to UTF-8, "
                          "e.g. iconv -f latin1 -t utf-8") from None
    if not any(row.strip() for row in rows):
        raise LlmbinError(f"{path} holds no text (every row is empty or null); pass a file with text in it")
    return rows


def _read_rows(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise LlmbinError(f"{path} is not a readable parquet file ({str(exc).splitlines()[0]}); check the file") from None
        if "text" not in table.column_names:
            raise LlmbinError(f"{path} has no 'text' column (columns: {', '.join(table.column_names)})")
        rows = table.column("text").to_pylist()
        wrong = next((r for r in rows if r is not None and not isinstance(r, str)), None)
        if wrong is not None:
            raise LlmbinError(f"{path}'s 'text' column holds {type(wrong).__name__} values, not strings; pass a text column")
        return [t or "" for t in rows]
    if suffix in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        text = json.loads(line)["text"]
                    except (ValueError, KeyError, TypeError):
                        raise LlmbinError(f"{path}:{n} is not a JSON object with a 'text' field") from None
                    if text is not None and not isinstance(text, str):
                        raise LlmbinError(f"{path}:{n}: 'text' is a {type(text).__name__}, not a string; fix that line")
                    rows.append(text or "")
        return rows
    if suffix in (".txt", ".raw", ".text"):
        return path.read_text(encoding="utf-8").split("\n")
    raise LlmbinError(f"unsupported data file type {suffix!r} for {path}; use .parquet, .jsonl or .txt")


def _from_hub(dataset: str, split: str, purpose: str) -> list[str]:
    import contextlib

    from ..hub import hub_offline, offline_mode

    offline = hub_offline()  # then only datasets' cache is tried: it would otherwise retry the hub for 30 s
    try:
        with offline_mode() if offline else contextlib.nullcontext():
            return _load_from_hub(dataset, split)
    except Exception as exc:  # network, auth or missing data set: all the user can fix the same way
        option = "--calib-data" if purpose == "calibration" else "--eval-data"
        local = " or set LLMBIN_DATA to the folder of its local copy" if (dataset, purpose) in LOCAL_FILES else ""
        if offline:
            raise LlmbinError(f"{dataset} cannot be downloaded: the Hugging Face hub does not answer (offline) and no "
                              f"cached copy was found; give a local .parquet/.jsonl/.txt file ({option} PATH){local}"
                              ) from None
        raise LlmbinError(
            f"could not load {dataset} ({split}) from the Hugging Face hub ({type(exc).__name__}); "
            f"go online, or pass a local file ({option} PATH){local}"
        ) from None


def _load_from_hub(dataset: str, split: str) -> list[str]:
    from datasets import load_dataset

    if dataset == "wikitext2":
        return load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    if dataset == "ptb":
        return load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"]
    shard = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
    return load_dataset("allenai/c4", data_files={split: shard}, split=split)["text"]


def dataset_rows(dataset: str, purpose: str) -> list[str]:
    """Rows of a standard data set: ``purpose`` is ``calibration`` (train split) or ``test``."""
    if dataset not in DATASETS:
        raise LlmbinError(f"unknown data set {dataset!r}; use one of {', '.join(DATASETS)} or a file path")
    local = local_file(dataset, purpose)
    if local is not None:
        return read_text_file(local)
    split = "train" if purpose == "calibration" else ("validation" if dataset == "c4" else "test")
    return _from_hub(dataset, split, purpose)


def join_rows(rows: list[str], dataset: str = "wikitext2") -> str:
    # The papers' conventions: wikitext rows joined with blank lines, PTB sentences with spaces.
    return (" " if dataset == "ptb" else "\n\n").join(rows)


def resolve_text(source: str, purpose: str) -> str:
    """A data set name or a file path -> joined text."""
    if source in DATASETS:
        return join_rows(dataset_rows(source, purpose), source)
    if Path(source).suffix or os.path.lexists(source):
        return join_rows(read_text_file(source))
    raise LlmbinError(f"unknown data source {source!r}; use one of {', '.join(DATASETS)} or a path to a data file")
