"""Bit accounting: the true storage cost of the quantized linear layers."""
from __future__ import annotations

from pathlib import Path

import torch

from .nn.binary_linear import BinaryLinear


def bit_report(model: torch.nn.Module) -> dict:
    """Bits per weight of the packed linear layers, every plane, scale, salient value and position counted."""
    weights = bits = 0
    for module in model.modules():
        if isinstance(module, BinaryLinear):
            weights += module.in_features * module.out_features
            bits += module.packed().storage_bits()
    return {
        "quantized_weights": weights,
        "quantized_bits": bits,
        "bits_per_weight": bits / weights if weights else None,
        "fp16_bytes": 2 * sum(p.numel() for p in _unique_float_tensors(model)) + 2 * weights,
    }


def _unique_float_tensors(model):
    seen = set()
    for module in model.modules():
        if isinstance(module, BinaryLinear):
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen and p.is_floating_point():
                seen.add(id(p))
                yield p


def directory_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
