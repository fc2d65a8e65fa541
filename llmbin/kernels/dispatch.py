"""Which kernel a packed layer runs: ``LLMBIN_KERNEL`` and what this machine has built."""
from __future__ import annotations

import os

import torch

from ..errors import LlmbinError
from .cpu import extension

KERNEL_MODES = ("auto", "exact", "reference")


def kernel_mode() -> str:
    """``LLMBIN_KERNEL``: ``auto`` (fastest available, the default), ``exact`` (the fastest kernel
    that is exact in fp32: on CPU the float path, not table lookup) or ``reference`` (plain torch)."""
    mode = os.environ.get("LLMBIN_KERNEL", "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise LlmbinError(f"LLMBIN_KERNEL={mode!r} is not a kernel mode; use one of: {', '.join(KERNEL_MODES)}")
    return mode


def kernel_available(device: torch.device) -> bool:
    """Whether ``packed_linear`` runs a real kernel (not a dense fallback) on ``device``."""
    if device.type == "cpu":
        return extension() is not None
    return device.type == "cuda"


def kernel_path(x: torch.Tensor) -> str | None:
    """How a layer runs ``x`` (hot path: one environment read): ``None`` for the plain-torch
    reference, else the ``packed_linear`` path, ``auto`` or ``exact``."""
    mode = kernel_mode() if os.environ.get("LLMBIN_KERNEL") else "auto"
    if torch.compiler.is_compiling():  # traced: never build here; the operators fall back where no kernel is built
        return None if mode == "reference" or not (x.is_cpu or x.is_cuda) else mode
    if mode == "reference" or not (extension() is not None if x.is_cpu else x.is_cuda):
        return None
    return mode

