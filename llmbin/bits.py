"""Bit accounting: the true storage cost of the quantized linear layers (and of quantized tables)."""
from __future__ import annotations

from pathlib import Path

import torch

from .nn.binary_linear import BinaryLinear
from .nn.table_weights import TableModule, stored_tables


def bit_report(model: torch.nn.Module) -> dict:
    """Bits per weight of the packed linear layers, every plane, scale, salient value and position
    counted; ``by_layer`` splits them by the layer's name within its block (``mlp.down_proj``), so a
    mix of per-layer options shows where its bits go."""
    weights = bits = 0
    by_layer: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, BinaryLinear):
            count, stored = module.in_features * module.out_features, module.packed().storage_bits()
            weights, bits = weights + count, bits + stored
            kind = by_layer.setdefault(_within_block(name), [0, 0])
            kind[0], kind[1] = kind[0] + count, kind[1] + stored
    tables, table_weights = {}, 0
    for name, module in stored_tables(model).items():  # a tied output matrix is the embedding's table
        table = module.table()
        count = table.shape[0] * table.shape[1]
        tables[name] = {"bits": table.bits, "group_size": table.group_size, "bits_per_weight": table.storage_bits() / count}
        table_weights += count
    return {
        "quantized_weights": weights,
        "quantized_bits": bits,
        "bits_per_weight": bits / weights if weights else None,
        "by_layer": {k: {"weights": n, "bits_per_weight": b / n} for k, (n, b) in by_layer.items()},
        # the embedding and output matrix when stored as quantized tables (--embedding-bits)
        "tables": tables,
        "fp16_bytes": 2 * sum(p.numel() for p in _unique_float_tensors(model)) + 2 * (weights + table_weights),
    }


def _within_block(name: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``mlp.down_proj``: the name after the last block index."""
    parts = name.split(".")
    index = max((i for i, part in enumerate(parts) if part.isdigit()), default=-1)
    return ".".join(parts[index + 1:]) or name


def _unique_float_tensors(model):
    seen = set()
    for module in model.modules():
        if isinstance(module, (BinaryLinear, TableModule)):
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen and p.is_floating_point():
                seen.add(id(p))
                yield p


def directory_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
