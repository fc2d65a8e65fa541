"""A source model's float weights where they lie: the safetensors shards of a Hugging Face folder.

:func:`shard_weights` maps every state-dict name of a (meta-device) model skeleton to the file
and the stored name that hold it, and returns accelerate's ``OffloadedWeightsLoader`` over that
index: a mapping that opens the shard and reads the one tensor asked for, in its stored dtype
(memory-mapped by safetensors), so only what the driver asks for is ever resident. Every name
must be found, or be tied to one that is: a skeleton is never left with random layers.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import LlmbinError
from .shards import by_file, shard_files
from .tensors import SAFETENSORS_DTYPES


def stored_float_dtype(files: dict[str, Path]) -> torch.dtype | None:
    """The dtype of most stored float bytes (read from the shard headers only)."""
    counts: Counter = Counter()
    try:
        for file, names in by_file(files).items():
            with safe_open(str(file), framework="pt") as f:
                for name in names:
                    piece = f.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                    if dtype is not None and dtype.is_floating_point:
                        counts[dtype] += dtype.itemsize * torch.Size(piece.get_shape()).numel()
    except (OSError, ValueError, SafetensorError) as exc:
        raise LlmbinError(f"a safetensors shard is unreadable ({exc}); copy or download the model again") from None
    return counts.most_common(1)[0][0] if counts else None


def shard_weights(folder: str | Path, model: torch.nn.Module, files: dict[str, Path] | None = None):
    """An ``OffloadedWeightsLoader`` from each of ``model``'s state-dict names to its stored tensor.

    Stored names may lack (or add) the model's ``base_model_prefix``, as older checkpoints do;
    a name missing from the checkpoint is accepted only when it is tied to one that is there
    (``lm_head.weight`` of a model with tied embeddings)."""
    from accelerate.utils import OffloadedWeightsLoader

    files = shard_files(folder) if files is None else files
    prefix = getattr(model, "base_model_prefix", "") or ""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    index, missing = {}, []
    for names in groups.values():
        found = next((s for n in names for s in _stored_candidates(n, prefix) if s in files), None)
        if found is None:
            missing += names
            continue
        entry = {"safetensors_file": str(files[found]), "weight_name": found}
        index.update({n: entry for n in names})
    if missing:
        raise LlmbinError(
            f"{folder} has no stored tensor for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
            f"({len(missing)} in all); the weights do not match config.json, copy or download the model again"
        )
    return OffloadedWeightsLoader(index=index)


def _stored_candidates(name: str, prefix: str) -> list[str]:
    out = [name]
    if prefix and name.startswith(prefix + "."):
        out.append(name[len(prefix) + 1:])
    elif prefix:
        out.append(f"{prefix}.{name}")
    return out
