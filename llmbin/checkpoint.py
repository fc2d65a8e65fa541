"""The packed checkpoint: ``config.json`` (with ``quantization_config``) + ``model.safetensors`` + tokenizer.

``model.safetensors`` holds every packed layer's tensors under the layer's module name (see
``PackedWeight``), the remaining parameters in fp16, and in its header metadata the format
name, format version and a JSON description of every packed layer. Nothing about the
format is encoded in file names.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import LlmbinError
from .models import set_submodule
from .nn.binary_linear import BinaryLinear
from .nn.half_weights import serve_half_weights
from .packing.packed_weight import FORMAT_VERSION, READABLE_VERSIONS, PackedWeight

FORMAT_NAME = "llmbin-packed"
WEIGHTS_FILE = "model.safetensors"
STORAGE_DTYPE = torch.float16


def binary_modules(model: torch.nn.Module) -> dict[str, BinaryLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BinaryLinear)}


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], modules: dict[str, BinaryLinear]) -> None:
    """Write tensors plus the packed-layer description; ``modules`` must be among ``tensors``' owners."""
    layers = {name: m.packed().metadata() for name, m in modules.items()}
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "layers": json.dumps(layers)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Read a file written by :func:`write_tensors`; corrupt or foreign files raise ``LlmbinError``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LlmbinError(f"{path} is truncated or corrupt ({exc}); re-create the checkpoint with llmbin quantize") from None
    if metadata.get("format") != FORMAT_NAME:
        raise LlmbinError(f"{path} is not an llmbin packed checkpoint; create one with llmbin quantize")
    if metadata.get("format_version") not in {str(v) for v in READABLE_VERSIONS}:
        raise LlmbinError(
            f"{path} uses packed format version {metadata.get('format_version')}, this llmbin reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; install the llmbin version that wrote it or re-quantize"
        )
    return tensors, json.loads(metadata["layers"])


def modules_from_tensors(tensors: dict[str, torch.Tensor], layers: dict[str, dict]) -> dict[str, BinaryLinear]:
    """Build ``BinaryLinear`` modules, consuming their tensors from ``tensors``."""
    modules = {}
    for name, meta in layers.items():
        try:
            packed = PackedWeight.from_tensors(tensors, name, meta)
        except (KeyError, ValueError) as exc:
            raise LlmbinError(f"checkpoint layer {name} is damaged ({exc}); re-create the checkpoint") from None
        for key in packed.tensors(name):
            del tensors[key]
        modules[name] = BinaryLinear(packed, tensors.pop(f"{name}.bias", None))
    return modules


def _as_stored(value: torch.Tensor) -> torch.Tensor:
    """A tensor as the checkpoint stores it: floats in ``STORAGE_DTYPE``, packed codes as they are."""
    return value.to(STORAGE_DTYPE) if value.is_floating_point() else value


@torch.no_grad()
def round_to_storage(model: torch.nn.Module) -> None:
    """Round every stored float tensor to the checkpoint's storage dtype, in place, so the
    in-memory model computes exactly what the saved-then-loaded one will."""
    for value in model.state_dict().values():
        if value.is_floating_point():
            value.copy_(_as_stored(value))


def save(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write the checkpoint to a temporary sibling directory, then rename it to ``out_dir``."""
    out = Path(out_dir)
    if out.exists():
        raise LlmbinError(f"output directory {out} already exists; choose another --out or remove it")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tensors, seen = {}, set()
        for key, value in model.state_dict().items():
            if value.data_ptr() in seen and value.numel():  # tied weights (e.g. lm_head = embed_tokens): stored once
                continue
            seen.add(value.data_ptr())
            tensors[key] = _as_stored(value)
        write_tensors(tmp / WEIGHTS_FILE, tensors, binary_modules(model))
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a packed checkpoint as a transformers model whose linear layers are ``BinaryLinear``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / WEIGHTS_FILE).is_file():
        raise LlmbinError(f"{path} is not an llmbin checkpoint (needs config.json and {WEIGHTS_FILE}); "
                          "create one with llmbin quantize")
    config = AutoConfig.from_pretrained(path)
    qconfig = getattr(config, "quantization_config", None)
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "llmbin":
        raise LlmbinError(f"{path}/config.json has no llmbin quantization_config; create the checkpoint with llmbin quantize")
    tensors, layers = read_tensors(path / WEIGHTS_FILE)
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
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in missing if _is_meta(model, k)]
    if missing or unexpected:
        problem = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise LlmbinError(f"checkpoint {path} does not match its config ({problem}); re-create the checkpoint")
    for module in modules.values():
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)
    if dtype == torch.float32 and torch.device(device).type == "cpu":
        serve_half_weights(model, STORAGE_DTYPE)  # the fp16 lm_head, widened in the kernel: exact, half the bytes
    return model.to(device).eval()


def _is_meta(model: torch.nn.Module, key: str) -> bool:
    try:
        return model.get_parameter(key).is_meta
    except AttributeError:
        return model.get_buffer(key).is_meta
