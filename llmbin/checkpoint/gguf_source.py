"""A source model's float weights where they lie: the tensors of a GGUF file, read one at a time.

:func:`gguf_weights` maps every state-dict name of a (meta-device) model skeleton to the GGUF
tensor that holds it, by transformers' own name map (``get_gguf_hf_weights_map``), and returns a
lazy mapping that memory-maps just that tensor when the driver asks for it, dequantizes it with
the ``gguf`` package and undoes llama.cpp's conversions with transformers' ``TensorProcessor``
(the q/k row permutation of Llama-family models), so the value is, bit for bit, what
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=..., dtype=...)`` loads, in that dtype.
The map of the file is dropped after each tensor, so only what is asked for is ever resident.
Every name must be found, or be tied to one that is: a skeleton is never left with random layers.

Only GGUF architectures that transformers loads through its legacy dequantizing loader are
streamed (Llama, Mistral, Qwen2 and the like); :func:`streamable` says which.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import LlmbinError


class _Stored(NamedTuple):
    """Where one GGUF tensor's data is in the file, as ``GGUFReader`` lays it out."""

    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    tensor_type: int


def gguf_architecture(path: str | Path) -> str:
    from transformers.integrations.gguf.reader import read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(path))
    return metadata["general.architecture"]


def streamable(path: str | Path) -> bool:
    """Whether transformers loads this file's architecture through its legacy loader (dequantized with
    ``gguf`` tensor by tensor), whose result this source reproduces; newer ones are loaded whole."""
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:  # an older transformers: every architecture takes the legacy path
        return True
    return not is_gguf_arch_supported(gguf_architecture(path))


class GgufWeights(Mapping):
    """State-dict name -> tensor, read from the GGUF file on access (never cached)."""

    def __init__(self, path: str | Path, index: dict[str, str], stored: dict[str, _Stored], processor,
                 dtype: torch.dtype):
        self.path = str(path)
        self.index = index  # state-dict name -> GGUF tensor name
        self.stored = stored
        self.processor = processor
        self.dtype = dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        gguf_name = self.index[name]
        where = self.stored[gguf_name]
        data = np.memmap(self.path, dtype=where.dtype, mode="r", offset=where.offset, shape=where.shape)
        try:
            result = self.processor.process(weights=_dequantize(data, where.tensor_type), name=gguf_name)
            if result.name != gguf_name:
                raise LlmbinError(f"{gguf_name}: transformers converts this GGUF tensor into others; "
                                  "llmbin cannot stream this architecture, load it whole")
            weights = result.weights
            if np.may_share_memory(weights, data) or not weights.flags.writeable:
                weights = np.copy(weights)  # off the file's map, as transformers' np.copy takes it
            tensor = torch.from_numpy(np.ascontiguousarray(weights))
        finally:
            del data
        return tensor.to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


CHUNK_BYTES = 4 << 20


def _dequantize(data: np.ndarray, tensor_type: int) -> np.ndarray:
    """``gguf.dequantize(data, tensor_type)``, a few MB of rows at a time into one float32 array:
    the same values (each block is dequantized on its own), without gguf's full-size temporaries
    (several times the tensor's float32 size for the K-quants, GBs for a 150k-token embedding)."""
    from gguf import GGMLQuantizationType, dequantize

    if tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or data.ndim < 2:
        return dequantize(data, tensor_type)
    rows = max(1, CHUNK_BYTES // max(1, data[0].nbytes))
    out = None
    for start in range(0, data.shape[0], rows):
        part = dequantize(data[start:start + rows], tensor_type)
        if out is None:
            out = np.empty((data.shape[0], *part.shape[1:]), dtype=part.dtype)
        out[start:start + part.shape[0]] = part
    return out


def gguf_weights(path: str | Path, model: torch.nn.Module, dtype: torch.dtype) -> GgufWeights:
    """A :class:`GgufWeights` for each of ``model``'s state-dict names, in ``dtype``.

    A name missing from the file is accepted only when it is tied to one that is there
    (``lm_head.weight`` of a model with tied embeddings); a separate ``output.weight`` is the
    untied head's."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    path = str(path)
    try:
        reader = GGUFReader(path)
        architecture = read_field(reader, "general.architecture")[0]
        stored = {t.name: _Stored(int(t.data_offset), t.data.dtype, tuple(t.data.shape), t.tensor_type)
                  for t in reader.tensors}
        del reader
        config = load_gguf_checkpoint(path, return_tensors=False)["config"]  # what the processor is built with
    except (OSError, ValueError) as exc:
        raise LlmbinError(f"GGUF file {path} is unreadable ({exc}); copy or download it again") from None
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
    to_gguf: dict[str, str] = {}
    for gguf_name, hf_name in get_gguf_hf_weights_map(model, processor).items():
        to_gguf.setdefault(hf_name, gguf_name)
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    index, missing = {}, []
    for names in groups.values():
        found = next((to_gguf[n] for n in names if to_gguf.get(n) in stored), None)
        if found is None:
            missing += names
            continue
        index.update({n: found for n in names})
    if missing:
        raise LlmbinError(
            f"GGUF file {path} has no tensor for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
            f"({len(missing)} in all); the file does not match its architecture, use another GGUF file"
        )
    return GgufWeights(path, index, stored, processor, dtype)
