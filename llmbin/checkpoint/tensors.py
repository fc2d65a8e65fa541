"""One safetensors file of packed tensors: the storage dtype, and writing/reading a file with its layer description.

Every file llmbin writes (a checkpoint shard, a finished block of an interrupted run) holds
tensors under their module names and, in its header metadata, ``format: pt`` (what
transformers writes and expects), ``llmbin_format``, the format version and ``layers``: a JSON
description (``PackedWeight.metadata()``) of packed layers, at least those whose tensors are
in that file (a checkpoint's shards each describe every layer, as ``save_pretrained`` writes
them). Nothing about the format is encoded in file names.

From version 5 the header also holds ``digests``: a JSON map of tensor name to its digest
(``llmbin.checkpoint.digests``), covering at least the file's own tensors, plus ``__layers__`` for the layer
description. Reading verifies the file against it (every byte of its tensors, its header's dtypes
and shapes, and the layer description) unless verification is switched off
(``LLMBIN_VERIFY=0``, :func:`verification`). Files of versions 3 and 4 have no digests and are
read unverified.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import LlmbinError
from ..packing.packed_weight import (
    FORMAT_VERSION,
    READABLE_VERSIONS,
    STORAGE_DTYPE,
    TABLE_VERSION,
)
from ..packing.table import TABLE_KIND
from .digests import (
    ALGORITHM,
    DIGEST_CHARS,
    TORCH_DTYPE_NAMES,
    file_digests,
    stored_bytes,
    tensor_digest,
    tensor_hasher,
    text_digest,
)
from .folder import write_error

FORMAT_NAME = "llmbin-packed"
FORMAT_KEY = "llmbin_format"  # "format" itself is transformers' ("pt")
SAFETENSORS_DTYPES = {name: dtype for dtype, name in TORCH_DTYPE_NAMES.items()}  # a safetensors header's dtype names
DIGESTS_KEY, LAYERS_DIGEST = "digests", "__layers__"
FIRST_DIGESTED_VERSION = 5
_VERIFY = contextvars.ContextVar("llmbin_verify", default=None)


def verifying() -> bool:
    """Whether reads verify digests: on unless ``LLMBIN_VERIFY=0`` or inside ``verification(False)``."""
    chosen = _VERIFY.get()
    return chosen if chosen is not None else os.environ.get("LLMBIN_VERIFY", "1") != "0"


@contextlib.contextmanager
def verification(enabled: bool | None):
    """Switch digest verification on or off for the reads inside the ``with`` block (None: leave
    it as it is, which by default is what ``LLMBIN_VERIFY`` says)."""
    token = _VERIFY.set(_VERIFY.get() if enabled is None else bool(enabled))
    try:
        yield
    finally:
        _VERIFY.reset(token)


def stored_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the checkpoint stores a tensor of ``dtype`` in: floats in ``STORAGE_DTYPE``, packed codes as they are."""
    return STORAGE_DTYPE if dtype.is_floating_point else dtype


def as_stored(value: torch.Tensor) -> torch.Tensor:
    """A tensor as the checkpoint stores it (:func:`stored_dtype`)."""
    return value.to(stored_dtype(value.dtype))


NARROWING_CHUNK = 1 << 22  # elements converted and checked at a time: a few MB of temporaries, whatever the tensor


def stored_checked(key: str, value: torch.Tensor) -> torch.Tensor:
    """``as_stored(value)``, converted a chunk at a time so that the overflow check's temporaries stay
    small (whole-tensor checks cost 1.5 GB on a 150k-token embedding); a value that is finite but
    beyond the storage dtype's range is refused by name."""
    dtype = stored_dtype(value.dtype)
    if dtype == value.dtype:
        return value
    stored = torch.empty(value.shape, dtype=dtype, device=value.device)
    for source, target in zip(value.reshape(-1).split(NARROWING_CHUNK), stored.view(-1).split(NARROWING_CHUNK)):
        target.copy_(source)
        if torch.isinf(target).any() and not torch.isinf(source).any():
            raise LlmbinError(f"{key} has values beyond the float16 range of the checkpoint; this model cannot be "
                              "stored by llmbin's format (scale or clip that tensor first)")
    return stored


def layer_metadata(modules: Mapping[str, torch.nn.Module]) -> dict[str, dict]:
    """Each packed module's layout (``BinaryLinear.layout``), by module name."""
    return {name: m.layout for name, m in modules.items()}


def file_metadata(layers: dict[str, dict], tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The safetensors header metadata of a file holding ``tensors`` (as they will be stored; more are
    fine, e.g. every shard's) and (some of) the packed ``layers``."""
    return _metadata(layers, {name: tensor_digest(name, value) for name, value in tensors.items()})


def _metadata(layers: dict[str, dict], digests: Mapping[str, str]) -> dict[str, str]:
    described = json.dumps(layers, sort_keys=True)
    digests = {**digests, LAYERS_DIGEST: text_digest(described)}
    # the lowest version that describes the file: version-5 readers keep reading files without tables
    version = TABLE_VERSION if any(layout.get("kind") == TABLE_KIND for layout in layers.values()) else FORMAT_VERSION
    return {"format": "pt", FORMAT_KEY: FORMAT_NAME, "format_version": str(version), "layers": described,
            "digest_algorithm": ALGORITHM, DIGESTS_KEY: json.dumps(digests, sort_keys=True)}


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor], layers: dict[str, dict]) -> None:
    """Write ``tensors`` (on any device) plus the description of the packed ``layers`` among them."""
    write_streamed(path, {k: v.to("meta") for k, v in tensors.items()}, tensors.__getitem__, layers)


def write_streamed(path: Path, shapes: Mapping[str, torch.Tensor], fetch: Callable[[str], torch.Tensor],
                   layers: dict[str, dict]) -> None:
    """Write a safetensors file one tensor at a time: ``shapes`` gives each tensor's stored shape and
    dtype (a meta tensor will do), ``fetch(name)`` the tensor, which is checked against it, written,
    hashed and released before the next is fetched. At most one tensor is resident, whatever the
    file's size.

    The header goes first with every digest zeroed (a digest's width is fixed, so the header's
    length is known) and is rewritten in place once the data has been hashed. Tensors are laid out
    as safetensors lays them out (widest dtype first, then by name), each aligned to its dtype."""
    names = sorted(shapes, key=lambda n: (-shapes[n].element_size(), n))
    entries, offset = {}, 0
    for name in names:
        end = offset + shapes[name].numel() * shapes[name].element_size()
        entries[name] = {"dtype": TORCH_DTYPE_NAMES[shapes[name].dtype], "shape": list(shapes[name].shape),
                         "data_offsets": [offset, end]}
        offset = end

    def header(digests: Mapping[str, str]) -> bytes:
        text = json.dumps({"__metadata__": _metadata(layers, digests), **entries}, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-aligned, as safetensors pads it
        return struct.pack("<Q", len(text)) + text

    digests = dict.fromkeys(names, "0" * DIGEST_CHARS)
    placeholder = header(digests)
    try:
        with open(path, "wb") as f:
            f.write(placeholder)
            for name in names:
                tensor = fetch(name)
                expected = shapes[name]
                if tensor.dtype != expected.dtype or tensor.shape != expected.shape:
                    raise LlmbinError(f"{name} is {tuple(tensor.shape)} {tensor.dtype}, expected "
                                      f"{tuple(expected.shape)} {expected.dtype}; the finished blocks are damaged, "
                                      "delete the .partial folder and rerun")
                digests[name] = _write_hashed(f, name, tensor)
                del tensor
            final = header(digests)
            if len(final) != len(placeholder):
                raise AssertionError(f"{path}: a digest is not {DIGEST_CHARS} hex characters wide")
            f.seek(0)
            f.write(final)
    except OSError as exc:
        Path(path).unlink(missing_ok=True)
        raise write_error(exc, path) from None
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise


def _write_hashed(f, name: str, tensor: torch.Tensor) -> str:
    """Append ``tensor``'s bytes to ``f`` and return its digest (a function, so no view of it outlives the call)."""
    h = tensor_hasher(name, tensor)
    for piece in stored_bytes(tensor):
        h.update(piece)
        f.write(piece)
    return h.hexdigest()


def verify_file(path: Path, metadata: dict[str, str]) -> None:
    """Check every tensor of a version-5 file, and its layer description, against the recorded digests."""
    if int(metadata.get("format_version", 0)) < FIRST_DIGESTED_VERSION or not verifying():
        return
    fix = "the file is corrupt or was modified; re-download or re-create the checkpoint"
    try:
        recorded = json.loads(metadata[DIGESTS_KEY])
        if metadata.get("digest_algorithm") != ALGORITHM:
            raise ValueError(f"digest algorithm {metadata.get('digest_algorithm')!r}")
    except (KeyError, ValueError, TypeError) as exc:
        raise LlmbinError(f"{path} has no valid tensor digests ({exc}); {fix}") from None
    if recorded.get(LAYERS_DIGEST) != text_digest(metadata.get("layers", "")):
        raise LlmbinError(f"{path}: the packed-layer description does not match its digest; {fix}")
    try:
        actual = file_digests(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LlmbinError(f"{path} is truncated or corrupt ({exc}); re-download or re-create the checkpoint") from None
    for name, digest in actual.items():
        if recorded.get(name) != digest:
            problem = "has no recorded digest" if name not in recorded else "does not match its digest"
            raise LlmbinError(f"{path}: tensor {name} {problem}; {fix}")


def file_layers(path: Path) -> dict[str, dict]:
    """The packed-layer description in a file's header, after verifying the file's digests;
    foreign, corrupt, modified or too-new files raise ``LlmbinError``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LlmbinError(f"{path} is truncated or corrupt ({exc}); re-create the checkpoint with llmbin quantize") from None
    if FORMAT_NAME not in (metadata.get(FORMAT_KEY), metadata.get("format")):  # "format" held it up to version 2
        raise LlmbinError(f"{path} is not an llmbin packed checkpoint; create one with llmbin quantize")
    check_version(metadata.get("format_version"), path)
    verify_file(path, metadata)
    try:
        return json.loads(metadata["layers"])
    except (KeyError, ValueError):
        raise LlmbinError(f"{path} has a damaged layer description; re-create the checkpoint") from None


def check_version(version, source) -> None:
    if str(version) not in {str(v) for v in READABLE_VERSIONS}:
        raise LlmbinError(
            f"{source} uses packed format version {version}, this llmbin reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; install the llmbin version that wrote it or re-create it with llmbin quantize"
        )


def file_header(path: Path) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """A file's packed-layer description and an empty meta tensor of each stored tensor's shape and
    dtype, read from the header alone (nothing is loaded)."""
    layers = file_layers(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: torch.empty(f.get_slice(k).get_shape(), dtype=SAFETENSORS_DTYPES[f.get_slice(k).get_dtype()],
                                     device="meta")
                      for k in f.keys()}
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise LlmbinError(f"{path} is truncated or corrupt ({exc}); re-create the checkpoint with llmbin quantize") from None
    return layers, shapes


def read_tensors(path: Path, names: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Read a file written by :func:`write_tensors` (only ``names`` if given). Tensors are memory-mapped
    by safetensors: what is resident is what gets used."""
    layers = file_layers(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            missing = sorted(set(names or ()) - set(keys))
            if missing:
                raise LlmbinError(f"{path} lacks {', '.join(missing[:3])}; the checkpoint is incomplete, re-create it")
            tensors = {k: f.get_tensor(k) for k in (keys if names is None else names)}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LlmbinError(f"{path} is truncated or corrupt ({exc}); re-create the checkpoint with llmbin quantize") from None
    return tensors, layers

