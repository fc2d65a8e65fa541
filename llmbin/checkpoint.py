"""The packed checkpoint: ``config.json`` (with ``quantization_config``), safetensors weights
(``model.safetensors``, or transformers-style shards with ``model.safetensors.index.json``) and
the tokenizer.

Each weights file holds packed layers' tensors under the layer's module name (see
``PackedWeight``), the remaining parameters in fp16, and in its header metadata the format
name, format version and a JSON description of the packed layers it holds (``storage``).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import LlmbinError
from .models import set_submodule
from .nn.binary_linear import BinaryLinear
from .nn.half_weights import serve_half_weights
from .shards import MAX_SHARD_BYTES, SAFETENSORS_FILE, SAFETENSORS_INDEX, by_file, shard_files, write_sharded
from .storage import STORAGE_DTYPE, as_stored, modules_from_tensors, read_tensors


def binary_modules(model: torch.nn.Module) -> dict[str, BinaryLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BinaryLinear)}


@torch.no_grad()
def round_to_storage(model: torch.nn.Module) -> None:
    """Round every stored float tensor to the checkpoint's storage dtype, in place, so the
    in-memory model computes exactly what the saved-then-loaded one will."""
    for value in model.state_dict().values():
        if value.is_floating_point() and not value.is_meta:
            value.copy_(as_stored(value))


def save(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike, *,
         sources: Mapping[str, torch.Tensor] | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
         progress: bool = False) -> Path:
    """Write the checkpoint to a temporary sibling directory, then rename it to ``out_dir``.

    Tensors still on the meta device (a streamed model's released blocks and float layers) are
    read from ``sources``, a lazy mapping of state-dict names to tensors, one shard at a time."""
    out = Path(out_dir)
    if out.exists():
        raise LlmbinError(f"output directory {out} already exists; choose another --out or remove it")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = model.state_dict(keep_vars=True)
        shapes, seen = {}, set()
        for key, value in state.items():
            if id(value) in seen:  # tied weights (e.g. lm_head = embed_tokens): stored once
                continue
            seen.add(id(value))
            shapes[key] = torch.empty(value.shape, dtype=as_stored(torch.empty(0, dtype=value.dtype)).dtype, device="meta")

        def fetch(key: str) -> torch.Tensor:
            value = state[key].detach()
            if value.is_meta:
                try:
                    value = sources[key]
                except (KeyError, TypeError):
                    raise LlmbinError(f"{key} has no weights to save (it is on the meta device); pass its sources") from None
            stored = as_stored(value)
            if stored.is_floating_point() and stored.dtype != value.dtype and torch.isinf(stored).any() \
                    and not torch.isinf(value).any():
                raise LlmbinError(f"{key} has values beyond the float16 range of the checkpoint; this model cannot be "
                                  "stored by llmbin's format (scale or clip that tensor first)")
            return stored

        write_sharded(tmp, shapes, fetch, {name: m.layout for name, m in binary_modules(model).items()},
                      max_shard_bytes, progress)
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tmp.rename(out)
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
         device_map: str | dict | None = None, offload_folder: str | None = None):
    """Load a packed checkpoint as a transformers model whose linear layers are ``BinaryLinear``.

    The packed tensors stay as stored (memory-mapped). At float32 on the CPU the float layers
    that were not binarized (embeddings, lm_head) keep their fp16 values too (``HalfWeight*``).
    ``device_map`` (``"auto"`` or a dict) places blocks over GPUs, CPU and disk with accelerate."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise LlmbinError(f"{path} is not an llmbin checkpoint (needs config.json and {SAFETENSORS_FILE}); "
                          "create one with llmbin quantize")
    config = AutoConfig.from_pretrained(path)
    qconfig = getattr(config, "quantization_config", None)
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "llmbin":
        raise LlmbinError(f"{path}/config.json has no llmbin quantization_config; create the checkpoint with llmbin quantize")
    tensors, layers = read_checkpoint(path)
    modules = modules_from_tensors(tensors, layers)
    del config.quantization_config  # transformers would try to apply an unknown quantizer otherwise
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    config.quantization_config = qconfig
    for name, module in modules.items():
        try:
            set_submodule(model, name, module)
        except AttributeError:
            raise LlmbinError(f"checkpoint layer {name} does not exist in a {type(model).__name__}; re-create the checkpoint") from None
    half = dtype == torch.float32 and torch.device(device).type == "cpu" and device_map is None
    keep = _half_servable(model) if half else set()
    tensors = {k: v.to(dtype) if v.is_floating_point() and k not in keep else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in missing if _is_meta(model, k)]
    if missing or unexpected:
        problem = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise LlmbinError(f"checkpoint {path} does not match its config ({problem}); re-create the checkpoint")
    for module in modules.values():
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)
    if half:
        serve_half_weights(model, STORAGE_DTYPE)  # embeddings and lm_head served from fp16: exact, half the bytes
    if device_map is not None:
        return _dispatch(model, device_map, offload_folder).eval()
    return model.to(device).eval()


def _half_servable(model: nn.Module) -> set[str]:
    """State-dict names of the plain float layers' weights, which can stay 16-bit at float32."""
    return {f"{name}.weight" for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)}


def _dispatch(model: nn.Module, device_map, offload_folder):
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        if device_map != "auto":
            raise LlmbinError(f"--device-map must be 'auto' or a JSON object of module -> device; got {device_map!r}")
        device_map = infer_auto_device_map(model, no_split_module_classes=getattr(model, "_no_split_modules", None) or [])
    try:
        return dispatch_model(model, device_map=device_map, offload_dir=offload_folder)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise LlmbinError(f"cannot place the model with this device map ({str(exc).splitlines()[0]}); "
                          "check the device names and --offload-folder") from None


def _is_meta(model: torch.nn.Module, key: str) -> bool:
    try:
        return model.get_parameter(key).is_meta
    except AttributeError:
        return model.get_buffer(key).is_meta
