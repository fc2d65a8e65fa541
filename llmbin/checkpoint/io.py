"""The packed checkpoint: ``config.json`` (with ``quantization_config``), safetensors weights
(``model.safetensors``, or transformers-style shards with ``model.safetensors.index.json``) and
the tokenizer: a transformers model folder that ``from_pretrained`` loads once llmbin is imported.

Each weights file holds packed layers' tensors under the layer's module name (see
``PackedWeight``), the remaining parameters in fp16, and in its header metadata the format
name, format version and a JSON description of the packed layers (``storage``). ``save``
writes what ``save_pretrained`` writes (``hf_quantizer``), also for a streamed model whose
blocks are only on disk; ``load`` is ``from_pretrained`` with llmbin's defaults.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import LlmbinError, missing_path
from ..nn.binary_linear import BinaryLinear
from .digests import bytes_digest
from .folder import remove_stale_temporaries, temporary_dir, write_error
from .hf_quantizer import QUANT_METHOD, described_layouts
from .shards import (
    MAX_SHARD_BYTES,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    by_file,
    shard_files,
    write_sharded,
)
from .tensors import STORAGE_DTYPE, read_tensors, stored_checked, stored_dtype, verification, verifying


def binary_modules(model: torch.nn.Module) -> dict[str, BinaryLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BinaryLinear)}


@torch.no_grad()
def round_to_storage(model: torch.nn.Module) -> None:
    """Round every stored float tensor to the checkpoint's storage dtype, in place, so the
    in-memory model computes exactly what the saved-then-loaded one will."""
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not value.is_meta:
            value.copy_(stored_checked(name, value))


def save(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike, *,
         sources: Mapping[str, torch.Tensor] | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
         progress: bool = False) -> Path:
    """Write the checkpoint to a temporary sibling directory, then rename it to ``out_dir``.

    Tensors still on the meta device (a streamed model's released blocks and float layers) are
    read from ``sources``, a lazy mapping of state-dict names to tensors, one shard at a time."""
    out = Path(out_dir)
    if out.exists():
        raise LlmbinError(f"output directory {out} already exists{'' if out.is_dir() else ' (as a file)'}; choose "
                          "another --out or remove it")
    tmp = temporary_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise write_error(exc, out) from None
    remove_stale_temporaries(out)
    try:
        state = model.state_dict(keep_vars=True)
        shapes, seen = {}, set()
        for key, value in state.items():
            if id(value) in seen:  # tied weights (e.g. lm_head = embed_tokens): stored once
                continue
            seen.add(id(value))
            shapes[key] = torch.empty(value.shape, dtype=stored_dtype(value.dtype), device="meta")

        def fetch(key: str) -> torch.Tensor:
            value = state[key].detach()
            if value.is_meta:
                try:
                    value = sources[key]
                except (KeyError, TypeError):
                    raise LlmbinError(f"{key} has no weights to save (it is on the meta device); pass its sources") from None
            return stored_checked(key, value)

        write_sharded(tmp, shapes, fetch, described_layouts(model), max_shard_bytes, progress)
        model.config.dtype = STORAGE_DTYPE  # what its floats are stored in, as save_pretrained records it
        if tokenizer is not None:  # first, so that config.json records the digests of the files it wrote
            record_tokenizer_digests(model.config, tmp, tokenizer.save_pretrained(tmp))
        model.config.save_pretrained(tmp)
        tmp.rename(out)
    except OSError as exc:  # the config or tokenizer files (the weights raise LlmbinError themselves)
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(exc, out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Every tensor (memory-mapped) and packed-layer description of a single-file or sharded checkpoint."""
    files = shard_files(path)
    if not files:
        raise LlmbinError(f"{path} is not an llmbin checkpoint (needs config.json and {SAFETENSORS_FILE} or "
                          f"{SAFETENSORS_INDEX}); create one with llmbin quantize")
    tensors, layers = {}, {}
    for file, names in by_file(files).items():
        part, described = read_tensors(file, names)
        tensors.update(part)
        layers.update(described)
    return tensors, layers


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         device_map: str | dict | None = None, offload_folder: str | None = None, verify: bool | None = None, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` on a packed checkpoint, with llmbin's defaults
    (float32, eval mode) and one-line errors; its linear layers are ``BinaryLinear``.
    Every file is checked against its recorded digests first; ``verify=False`` skips that (default:
    on unless the environment sets ``LLMBIN_VERIFY=0``).

    The packed tensors stay as stored. At float32 on the CPU the float layers that were not
    binarized (embeddings, lm_head) keep their fp16 values too (``HalfWeight*``).
    ``device_map`` (``"auto"`` or a dict) places blocks over GPUs, CPU and disk with accelerate;
    other keyword arguments go to ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    path = check_checkpoint(path)
    if isinstance(device_map, str) and device_map != "auto":
        raise LlmbinError(f"--device-map must be 'auto' or a JSON object of module -> device; got {device_map!r}")
    if device_map is not None:
        kwargs.setdefault("offload_buffers", True)  # the packed weights are buffers: offloaded with the rest
    check_offload_folder(offload_folder)
    try:
        with verification(verify):
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map or torch.device(device),
                                                        offload_folder=offload_folder, **kwargs).eval()
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise load_error(exc, path, device_map) from None


def check_offload_folder(folder: str | os.PathLike | None) -> None:
    """``--offload-folder`` can hold the weights offloaded to disk: created if missing, and a file
    written and removed in it (the real test, for root and read-only file systems alike), before
    ``from_pretrained`` fails inside transformers with an ``OSError`` that names nothing."""
    import tempfile

    if folder is None:
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise LlmbinError(f"--offload-folder {folder} cannot hold the offloaded weights ({exc.strerror or exc}); "
                          "choose a folder you can write") from None


TOKENIZER_DIGESTS = "tokenizer_digests"  # quantization_config key: tokenizer file name -> digest of its bytes


def record_tokenizer_digests(config, folder: Path, written) -> None:
    """Record in ``config``'s ``quantization_config`` the digest of every file the tokenizer wrote
    into ``folder`` (``save_pretrained``'s list): the tensors' digests do not cover them, and a
    tokenizer that is not the weights' own gives fluent nonsense, not an error."""
    digests = {Path(f).name: bytes_digest(Path(f)) for f in written
               if Path(f).parent == folder and Path(f).is_file() and Path(f).name != "config.json"}
    qconfig = getattr(config, "quantization_config", None)
    if isinstance(qconfig, dict):
        qconfig[TOKENIZER_DIGESTS] = digests
    elif qconfig is not None:
        setattr(qconfig, TOKENIZER_DIGESTS, digests)


def verify_tokenizer(path: Path) -> None:
    """Check the tokenizer files against the digests recorded when the checkpoint was written
    (checkpoints from before they were recorded have none to check); skipped with verification off."""
    if not verifying():
        return
    try:
        recorded = json.loads((path / "config.json").read_text()).get("quantization_config", {}).get(TOKENIZER_DIGESTS)
    except (OSError, ValueError, AttributeError):
        return  # check_checkpoint reports an unreadable config.json
    fix = ("the tokenizer does not belong to these weights; copy the tokenizer files that llmbin quantize wrote, or "
           "re-create the checkpoint (--no-verify / LLMBIN_VERIFY=0 to load it anyway)")
    for name, digest in sorted((recorded or {}).items()):
        if Path(name).name != name or name in ("", ".", ".."):  # written as bare names: never read outside the folder
            raise LlmbinError(f"{path}: config.json records a digest for {name!r}, which is not a file of the checkpoint "
                              "folder; the config.json was edited or damaged, re-create the checkpoint")
        file = path / name
        if not file.is_file():
            raise LlmbinError(f"{path}: tokenizer file {name}, recorded when the checkpoint was written, is missing; {fix}")
        if bytes_digest(file) != digest:
            raise LlmbinError(f"{path}: tokenizer file {name} does not match its recorded digest; {fix}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "tokenizer_config.json")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a checkpoint folder, or a one-line error saying it is missing or broken."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise LlmbinError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); copy them from the "
                          "original model's folder (llmbin quantize writes them)")
    verify_tokenizer(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # sentencepiece, tiktoken and tokenizers raise unrelated types for a broken file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LlmbinError(f"the tokenizer in {path} cannot be loaded ({first}); copy the tokenizer files from the "
                          "original model's folder again") from None


def load_error(exc: Exception, path: Path, device_map) -> LlmbinError:
    """The one-line error for a failure inside ``from_pretrained`` (llmbin's own checks raise ``LlmbinError`` directly)."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if device_map is not None and isinstance(exc, (ValueError, KeyError)):
        return LlmbinError(f"cannot place the model with this device map ({first}); check the device names and --offload-folder")
    return LlmbinError(f"checkpoint {path} cannot be loaded ({first}); re-create the checkpoint")


def check_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` if it is a packed checkpoint folder (config.json with llmbin's quantization_config, safetensors weights)."""
    from transformers import AutoConfig

    path = Path(path)
    if path.suffix == ".gguf":
        raise LlmbinError(f"{path} is a GGUF file, not an llmbin checkpoint folder: to evaluate the original model use "
                          f"llmbin eval --model {path}")
    problem = missing_path(path, "folder")
    if problem:
        raise LlmbinError(f"checkpoint {path} {problem}; give the folder llmbin quantize wrote")
    if not (path / "config.json").is_file():
        raise LlmbinError(f"{path} is not an llmbin checkpoint (needs config.json and {SAFETENSORS_FILE}); "
                          "create one with llmbin quantize")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise LlmbinError(f"{path}/config.json cannot be read ({str(exc).splitlines()[0]}); re-create the checkpoint") from None
    qconfig = getattr(config, "quantization_config", None)
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD:
        raise LlmbinError(f"{path} is a model folder, not an llmbin checkpoint (its config.json has no llmbin "
                          f"quantization_config): to evaluate the original model use llmbin eval --model {path}; to "
                          f"make a checkpoint of it, llmbin quantize --model {path}")
    if not shard_files(path):
        raise LlmbinError(f"{path} is not an llmbin checkpoint (needs config.json and {SAFETENSORS_FILE} or "
                          f"{SAFETENSORS_INDEX}); create one with llmbin quantize")
    return path
