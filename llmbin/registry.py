"""Method registry: config class -> ``(W, H, config) -> PackedWeight``.

Adding a method means adding a config class and one registered function, nothing else.
"""
from __future__ import annotations

from typing import Callable

import torch

from .config import QuantConfig, config_fields
from .errors import LlmbinError
from .packing.packed_weight import PackedWeight

MethodFn = Callable[[torch.Tensor, torch.Tensor, QuantConfig], PackedWeight]
_METHODS: dict[str, tuple[type[QuantConfig], MethodFn]] = {}


def register_method(config_cls: type[QuantConfig]):
    def decorator(fn: MethodFn) -> MethodFn:
        _METHODS[config_cls.method] = (config_cls, fn)
        return fn

    return decorator


def available_methods() -> list[str]:
    return sorted(_METHODS)


def method_configs() -> list[type[QuantConfig]]:
    return [cls for cls, _ in _METHODS.values()]


def method_function(config: QuantConfig) -> MethodFn:
    return _METHODS[config.method][1]


def make_config(method: str, **options) -> QuantConfig:
    """Build and validate a config from a method name and options (unknown options are errors)."""
    if method not in _METHODS:
        raise LlmbinError(f"unknown method {method!r}; available: {', '.join(available_methods())}")
    cls = _METHODS[method][0]
    unknown = sorted(set(options) - set(config_fields(cls)))
    if unknown:
        raise LlmbinError(f"unknown option(s) for {method}: {', '.join(unknown)}; valid: {', '.join(config_fields(cls))}")
    config = cls(**options)
    config.validate()
    return config


def config_from_dict(data: dict) -> QuantConfig:
    """Inverse of ``QuantConfig.to_dict``."""
    data = dict(data)
    return make_config(data.pop("method", ""), **data)
