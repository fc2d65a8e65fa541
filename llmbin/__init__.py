"""llmbin: post-training binarization of large language models, with really packed checkpoints.

The public names load on first use (PEP 562), so that ``import llmbin`` (and with it the ``llmbin``
command, whose module lives in this package) does not wait for torch and transformers. Importing
llmbin still makes ``AutoModelForCausalLM.from_pretrained(checkpoint)`` work: see ``.registration``.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from . import registration as _registration
from .version import __version__  # noqa: F401

# public name -> the module that defines it
_PUBLIC = {
    "LlmbinConfig": ".checkpoint.hf_quantizer", "LlmbinHfQuantizer": ".checkpoint.hf_quantizer",
    "load": ".checkpoint.io", "save": ".checkpoint.io", "verification": ".checkpoint.tensors",
    "PBLLMConfig": ".config", "QuantConfig": ".config", "calibration_windows": ".data.calibration",
    "LlmbinError": ".errors", "open_model": ".models", "prepare_decode": ".nn.decode", "quantize": ".quantize",
    "quantize_and_save": ".quantize",
    "recipe_config": ".recipes", "available_methods": ".config", "make_config": ".config",
}
__all__ = ["LlmbinConfig", "LlmbinError", "LlmbinHfQuantizer", "PBLLMConfig", "QuantConfig", "available_methods",
           "calibration_windows", "load", "make_config", "open_model", "prepare_decode", "quantize",
           "quantize_and_save", "recipe_config", "save", "verification"]

if TYPE_CHECKING:  # for type checkers and documentation tools, which do not run __getattr__
    from .checkpoint.hf_quantizer import LlmbinConfig, LlmbinHfQuantizer
    from .checkpoint.io import load, save
    from .checkpoint.tensors import verification
    from .config import PBLLMConfig, QuantConfig, available_methods, make_config
    from .data.calibration import calibration_windows
    from .errors import LlmbinError
    from .models import open_model
    from .nn.decode import prepare_decode
    from .quantize import quantize, quantize_and_save
    from .recipes import recipe_config


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    """Importing the submodule ``llmbin.quantize`` sets the package attribute ``quantize`` to that
    module; the public name is the function, whichever was loaded first."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in _PUBLIC:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
_registration.install()  # AutoModelForCausalLM.from_pretrained(checkpoint) works once llmbin is imported
