"""The safetensors layout of a Hugging Face folder: one ``model.safetensors``, or shards named
``model-00001-of-0000N.safetensors`` listed by ``model.safetensors.index.json``.

Reading resolves tensor names to files (for source models and llmbin checkpoints alike).
Writing splits tensors with huggingface_hub's ``split_torch_state_dict_into_shards``, the
function transformers' ``save_pretrained`` uses (same names, same index, same 5 GB cap), and
writes one tensor at a time, each fetched only when it is written.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..errors import LlmbinError
from .tensors import write_streamed

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9  # transformers' default "5GB"


def shard_files(folder: str | Path) -> dict[str, Path]:
    """Stored tensor name -> file, from the index or the single ``model.safetensors``; empty when
    the folder has no safetensors weights. A listed shard that is missing is an error."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    try:
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: _inside(folder, name, file) for name, file in weight_map.items()}
            absent = sorted({p.name for p in files.values() if not p.is_file()})
            if absent:
                raise LlmbinError(f"{folder} lacks the shard(s) {', '.join(absent[:3])} its {SAFETENSORS_INDEX} lists; "
                                  "copy or download the whole folder again")
            return files
        single = folder / SAFETENSORS_FILE
        if single.is_file():
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise LlmbinError(f"the safetensors weights in {folder} are truncated or corrupt ({exc}); "
                         "copy or download them again, or re-create the checkpoint") from None
    return {}


def _inside(folder: Path, name: str, file: str) -> Path:
    """``folder / file``, refused unless ``file`` is a relative path without ``..``: an index naming
    ``../x`` or ``/x`` would make llmbin read a file the model does not own. Links are not
    resolved: a hub snapshot's files are links into its cache's blobs, which is fine."""
    if Path(file).is_absolute() or ".." in Path(file).parts:
        raise LlmbinError(f"{folder / SAFETENSORS_INDEX} maps {name} to {file!r}, outside the folder; an index may only "
                          "name files in its own folder: fix the index, or download the model again")
    return folder / file


def by_file(files: Mapping[str, Path]) -> dict[Path, list[str]]:
    grouped: dict[Path, list[str]] = {}
    for name, file in files.items():
        grouped.setdefault(file, []).append(name)
    return grouped


def write_sharded(folder: Path, shapes: Mapping[str, torch.Tensor], fetch: Callable[[str], torch.Tensor],
                  layers: Mapping[str, dict], max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool = False) -> list[Path]:
    """Write tensors as transformers would shard them, one tensor resident at a time.

    ``shapes`` maps each name, in order, to a tensor with its stored shape and dtype (a meta
    tensor will do); ``fetch(name)`` returns the tensor itself. Each shard's header describes
    every packed layer in ``layers``, as transformers' ``save_pretrained`` writes them."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(dict(shapes), filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_bytes)
    written = []
    shards = split.filename_to_tensors.items()
    for filename, names in tqdm(shards, desc="writing checkpoint", unit="shard", disable=not progress or len(shards) < 2):
        write_streamed(folder / filename, {name: shapes[name] for name in names}, fetch, dict(layers))
        written.append(folder / filename)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written

