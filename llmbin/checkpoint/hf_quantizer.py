"""llmbin as a transformers quantizer: ``AutoModelForCausalLM.from_pretrained(checkpoint)`` loads a
packed checkpoint once ``llmbin`` is imported (``register`` runs on import).

transformers reads ``quantization_config`` (``quant_method: llmbin``) from config.json, builds the
model on the meta device and hands it to ``LlmbinHfQuantizer`` before any weight is read. The
quantizer reads the safetensors headers of the checkpoint files (their layer descriptions and
tensor shapes, nothing else) and puts an empty ``BinaryLinear`` of the stored layout wherever a
packed layer is described; the packed tensors then load into it like any parameter, and through
transformers' own placement (``device_map``, CPU and disk offload). At fp32 on the CPU the
16-bit embeddings and lm_head load into ``HalfWeight*`` modules, as ``llmbin.quantize`` serves them.

Saving is transformers' ``save_pretrained``: the state dict is the checkpoint's (floats in the
storage dtype) and each shard's header carries the layer descriptions.

Without llmbin, transformers warns that it does not know ``llmbin`` and then meets each
layer's sign planes, stored as ``weight`` (uint8, 3-D), where a float ``(N, K)`` weight belongs:
a size-mismatch error for every packed layer, never a model with random layers.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.quantizers import (
    HfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..dtypes import auto_dtype
from ..errors import LlmbinError
from ..nn.binary_linear import BinaryLinear
from ..nn.half_weights import half_weight_skeleton
from ..nn.table_weights import stored_tables, table_skeleton, tie_tables
from ..nn.tree import set_submodule
from ..packing.packed_weight import FORMAT_VERSION, PackedWeight
from ..packing.table import TABLE_KIND
from .shards import SAFETENSORS_INDEX, shard_files
from .tensors import STORAGE_DTYPE, as_stored, check_version, file_header, file_metadata

QUANT_METHOD = "llmbin"
logger = logging.get_logger(__name__)


class LlmbinConfig(QuantizationConfigMixin):
    """A packed checkpoint's ``quantization_config``: the format version plus everything llmbin
    records about the run (method, its options, calibration, bits per weight), kept as given so
    that a saved model writes back the same record. Loading needs only ``format_version``."""

    def __init__(self, format_version: int = FORMAT_VERSION, **record):
        record.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        for key, value in record.items():
            setattr(self, key, value)


class LlmbinHfQuantizer(HfQuantizer):
    """Loads packed checkpoints (it cannot quantize on load: ``llmbin quantize`` calibrates first)."""

    requires_calibration = True
    _host_only = False  # set from from_pretrained's device_map: the load computes on the CPU

    def validate_environment(self, *args, device_map=None, **kwargs):
        check_version(self.quantization_config.format_version, "this checkpoint's config.json")
        self._host_only = _host_only(device_map)

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        # A checkpoint stores its floats in fp16, so dtype="auto" (transformers' default) arrives as
        # fp16 (as does an explicit fp16: the two cannot be told apart here). It gets llmbin's auto
        # rule: float32 on the CPU (exactly what llmbin.quantize computed), fp16 on a GPU.
        # bfloat16 and float32 are kept as asked.
        if dtype != STORAGE_DTYPE:
            return dtype
        chosen = auto_dtype(self._host_only, STORAGE_DTYPE)
        if chosen != dtype:
            logger.info("llmbin: a packed model on the CPU computes in float32 rather than float16 "
                        "(its packed weights and fp16 embeddings stay as stored)")
        return chosen

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs):
        if not checkpoint_files:
            raise LlmbinError("an llmbin checkpoint loads from its folder's safetensors files: "
                              "call from_pretrained(folder) without state_dict=")
        layers, shapes, held = {}, {}, {}
        for file in map(Path, checkpoint_files):
            described, stored = file_header(file)
            layers.update(described)
            shapes.update(stored)
            held.update(dict.fromkeys(stored, file.name))
        if not layers:
            raise LlmbinError(f"{Path(checkpoint_files[0]).parent} describes no packed layer; re-create the checkpoint")
        _check_index(Path(checkpoint_files[0]).parent, held)
        dtype = dtype or torch.get_default_dtype()
        by_module: dict[str, dict[str, torch.Tensor]] = {}  # module name -> {tensor name: meta tensor}
        for key, value in shapes.items():
            module, _, tensor = key.rpartition(".")
            by_module.setdefault(module, {})[tensor] = value
        for name, layout in layers.items():
            if layout.get("kind") != TABLE_KIND:
                set_submodule(model, name, _empty_binary_linear(model, name, layout, by_module.get(name, {}), dtype))
        try:
            table_skeleton(model, layers, shapes, dtype)
        except ValueError as exc:
            raise LlmbinError(f"checkpoint {Path(checkpoint_files[0]).parent} has a damaged table ({exc}); "
                              "re-create the checkpoint") from None
        _check_keys(model, shapes, Path(checkpoint_files[0]).parent)
        if dtype == torch.float32 and self._host_only:
            stored_half = {k for k, v in shapes.items() if v.dtype == STORAGE_DTYPE}
            half_weight_skeleton(model, stored_half | _tied_to(model, stored_half), STORAGE_DTYPE)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        tie_tables(model)
        for name, module in model.named_modules():
            if isinstance(module, BinaryLinear) and not module.weight.is_meta:
                try:  # the header's shapes were checked before loading; this checks what the salient stream decodes to
                    PackedWeight.from_tensors(dict(module.named_buffers(recurse=False)), "", module.layout)
                except (ValueError, RuntimeError) as exc:
                    raise LlmbinError(f"checkpoint layer {name} is damaged ({exc}); re-create the checkpoint") from None
        return model

    def get_state_dict_and_metadata(self, model):
        """What ``save_pretrained`` writes: floats in the storage dtype, every shard describing the packed layers."""
        state = {k: v if v.is_meta else as_stored(v) for k, v in model.state_dict().items()}
        metadata = file_metadata(described_layouts(model), _DigestView(model, state))
        metadata.pop("format")  # transformers sets it
        return state, metadata

    def _dequantize(self, model, dtype=None):
        """Every ``BinaryLinear`` replaced by an ``nn.Linear`` holding its decoded weight."""
        for name, module in list(model.named_modules()):
            if isinstance(module, BinaryLinear):
                linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                   device=module.weight.device, dtype=dtype)
                linear.weight.data = module.packed().dense(dtype or torch.float32)
                if module.bias is not None:
                    linear.bias.data = module.bias.data.to(linear.weight.dtype)
                set_submodule(model, name, linear)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        # Packed and 16-bit layers run as torch.library operators with fake implementations, so
        # torch.compile traces them whole (generate's compiled decode step with a static cache).
        return True


def described_layouts(model: nn.Module) -> dict[str, dict]:
    """What the files' headers describe: each packed layer's layout and each quantized table's
    (a tied output matrix is the embedding's table, stored and described once)."""
    layouts = {name: m.layout for name, m in model.named_modules() if isinstance(m, BinaryLinear)}
    return {**layouts, **{name: m.layout for name, m in stored_tables(model).items()}}


class _DigestView(dict):
    """``state`` for digesting: a disk-offloaded (meta) tensor is read back one at a time, as
    ``save_pretrained`` itself reads it when writing its shard."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]):
        super().__init__(state)
        self.model = model

    def items(self):
        for name, value in super().items():
            if value.is_meta:
                try:
                    from transformers.modeling_utils import load_offloaded_parameter

                    value = as_stored(load_offloaded_parameter(self.model, name))
                except (ImportError, KeyError, AttributeError, RuntimeError) as exc:
                    raise LlmbinError(f"{name} is offloaded and cannot be read back to record its digest ({exc}); "
                                      "load the model without disk offload to save it") from None
            yield name, value


def mark_quantized(model: nn.Module, record: dict) -> None:
    """Give a model quantized in memory what ``from_pretrained`` gives a loaded one: its
    ``quantization_config`` and quantizer, so ``save_pretrained`` writes a packed checkpoint."""
    config = LlmbinConfig(**record)
    model.config.quantization_config = config
    model.hf_quantizer = LlmbinHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model.config._is_quantized = True


def _empty_binary_linear(model: nn.Module, name: str, layout: dict, own: dict, dtype: torch.dtype) -> BinaryLinear:
    """A ``BinaryLinear`` of ``layout`` whose buffers are empty meta tensors of the stored shapes
    (``own``: the layer's stored tensors by their short names)."""
    try:
        target = model.get_submodule(name)
    except AttributeError:
        target = None
    if not isinstance(target, nn.Linear):
        raise LlmbinError(f"checkpoint layer {name} is not a linear layer of a {type(model).__name__}; "
                          "the checkpoint does not match its config.json, re-create it")
    try:
        packed = PackedWeight.from_tensors(own, "", layout)
    except (KeyError, ValueError, TypeError) as exc:
        raise LlmbinError(f"checkpoint layer {name} is damaged ({exc}); re-create the checkpoint") from None
    if packed.shape != (target.out_features, target.in_features):
        raise LlmbinError(f"checkpoint layer {name} is {packed.shape[0]} x {packed.shape[1]}, the model's is "
                          f"{target.out_features} x {target.in_features}; the checkpoint does not match its config.json")
    bias = own.get("bias")
    return BinaryLinear(packed, None if bias is None else torch.empty(bias.shape, dtype=dtype, device="meta"))


def _check_keys(model: nn.Module, stored: dict, folder: Path) -> None:
    """Every tensor the model expects is stored, and nothing else: transformers would initialise a
    missing one at random (and only log it)."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    expected = set(model.state_dict()) - tied
    missing, unexpected = sorted(expected - set(stored)), sorted(set(stored) - expected - tied)
    if missing or unexpected:
        problem = f"it lacks {', '.join(missing[:3])}" if missing else f"it has unexpected {', '.join(unexpected[:3])}"
        raise LlmbinError(f"checkpoint {folder} does not match its config.json ({problem}); re-create the checkpoint")


def _check_index(folder: Path, held: dict[str, str]) -> None:
    """A sharded checkpoint's index names, for each tensor, the shard that holds it (``held``: name -> file name)."""
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        return
    listed = shard_files(folder)
    wrong = sorted(name for name, file in listed.items() if held.get(name) != file.name)
    if wrong or set(held) - set(listed):
        raise LlmbinError(f"{index} does not match its shards (e.g. {(wrong or sorted(set(held) - set(listed)))[0]}); "
                          "the checkpoint is incomplete, re-create it or download it again")


def _tied_to(model: nn.Module, names: set[str]) -> set[str]:
    """State-dict names of weights tied to one of ``names`` (a tied lm_head is not stored)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {target for target, source in tied.items() if source in names}


def _host_only(device_map) -> bool:
    """Whether a load with this ``device_map`` computes on the CPU (weights in RAM or on disk)."""
    if device_map is None:
        return True
    if isinstance(device_map, (str, torch.device)):
        try:
            return torch.device(device_map).type == "cpu"
        except RuntimeError:  # "auto", "balanced", ...: accelerate picks the accelerators, if any
            return not torch.cuda.is_available()
    return all(str(d) in ("cpu", "disk") for d in device_map.values())


def register() -> None:
    """Make ``quant_method: llmbin`` known to transformers (idempotent)."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
    )

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not LlmbinConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a reloaded llmbin replaces its older classes
        register_quantization_config(QUANT_METHOD)(LlmbinConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not LlmbinHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(LlmbinHfQuantizer)
