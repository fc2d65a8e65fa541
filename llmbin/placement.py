"""Where the driver's tensors are: onloading a module's weights to the compute device, releasing them.

Two cases, one interface. A model loaded whole keeps its weights in memory: onloading moves
tensors to the device and releasing moves them back to the CPU. A model built empty (on the
meta device, ``accelerate.init_empty_weights``) has its weights in ``weights``, a lazy mapping
from state-dict names to stored tensors (:func:`llmbin.checkpoint.source.shard_weights`): onloading reads
just those tensors into place with accelerate's ``set_module_tensor_to_device``, cast to the
skeleton's dtype, and releasing puts them back on the meta device, so only the block being
worked on is ever resident.
"""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .errors import LlmbinError


class Placement:
    def __init__(self, device: str | torch.device = "cpu", weights: Mapping[str, torch.Tensor] | None = None):
        self.device = torch.device(device)
        self.weights = weights

    @property
    def streaming(self) -> bool:
        return self.weights is not None

    @functools.cached_property
    def stored_names(self) -> frozenset[str]:
        """The names ``weights`` holds (from its keys: a lazy mapping's ``in`` would read the tensor)."""
        return frozenset(self.weights or ())

    @property
    def home(self) -> torch.device:
        """Where released tensors go: the meta device when streaming, else the CPU."""
        return torch.device("meta" if self.streaming else "cpu")

    def onload(self, root: nn.Module, names: Iterable[str]) -> None:
        """Put the tensors ``names`` (full names of ``root``'s parameters and buffers) on the device."""
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            tensor = root.get_parameter(name) if _is_parameter(root, name) else root.get_buffer(name)
            if tensor.is_meta:
                try:
                    value = self.weights[name]
                except (KeyError, TypeError):
                    raise LlmbinError(f"{name} has no weights (it is on the meta device); load the model with its weights") from None
                try:
                    set_module_tensor_to_device(root, name, self.device, value=value)
                except ValueError as exc:  # a stored shape that does not match the config
                    raise LlmbinError(f"{name}: {exc}; the weights do not match config.json, "
                                      "copy or download the model again") from None
            elif tensor.device != self.device:
                set_module_tensor_to_device(root, name, self.device)

    def release(self, root: nn.Module, names: Iterable[str]) -> None:
        """Undo :meth:`onload`: each tensor back on the meta device (streaming) or the CPU. A tensor
        the stored weights lack (a non-persistent buffer such as rotary frequencies, computed when
        the model was built) goes to the CPU instead, since on the meta device it would be lost."""
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            home = self.home if not self.streaming or name in self.stored_names else torch.device("cpu")
            set_module_tensor_to_device(root, name, home)

    def onload_module(self, root: nn.Module, prefix: str) -> nn.Module:
        """Onload every tensor under the submodule ``prefix``."""
        self.onload(root, tensor_names(root.get_submodule(prefix), prefix))
        return root.get_submodule(prefix)

    def release_module(self, root: nn.Module, prefix: str) -> None:
        root.get_submodule(prefix).to(self.home)
        trim_heap()


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc keeps freed pages of a released block's tensors in its arenas, so a streamed run's RSS
    crept up block after block (20 MB per block at a 24-block, 300M-parameter shape) although
    nothing was reachable; trimming once per block costs milliseconds."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def tensor_names(module: nn.Module, prefix: str = "") -> list[str]:
    """Full names of every parameter and buffer (persistent or not) under ``module``, each once."""
    lead = f"{prefix}." if prefix else ""
    return [lead + n for n, _ in module.named_parameters()] + [lead + n for n, _ in module.named_buffers()]


def _is_parameter(root: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in (root.get_submodule(owner) if owner else root)._parameters
