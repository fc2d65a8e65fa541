"""Incoherence processing: quantize a layer in a seeded randomly rotated basis.

With orthogonal ``T`` (input side) and ``S`` (output side), the layer ``y = W·x`` equals
``y = Sᵀ·(S·W·Tᵀ)·(T·x)``. The method binarizes ``W' = S·W·Tᵀ`` against the Hessian of its
inputs ``T·x``, ``H' = T·H·Tᵀ``; the layer-output error ``tr(E·H·Eᵀ)`` is the same in both bases,
so every method's objective is unchanged while the rotated weights have no outlier rows or
columns to waste a scale on. The packed result records the seeds (``PackedWeight.rotation``);
the layer pipeline (``algorithms.layer``) applies the rotation around the method's function.
"""
from __future__ import annotations

import torch

from ..config import QuantConfig
from ..errors import LlmbinError
from ..packing.rotation import LayerRotation, layer_seed, split_size


def layer_rotation(config: QuantConfig, key: str) -> LayerRotation | None:
    """The rotation ``config`` asks for on the layer named ``key`` (seeds derived from both)."""
    if config.rotate == "none":
        return None
    output = layer_seed(config.rotate_seed, key + ":output") if config.rotate == "both" else None
    return LayerRotation(layer_seed(config.rotate_seed, key + ":input"), output)


def check_rotatable(config: QuantConfig, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse, before any calibration work, a ``--rotate`` that some layer's size cannot take.

    ``shapes`` maps layer names to weight shapes ``(N, K)``: ``K`` is rotated, and ``N`` too with
    ``rotate: both``.
    """
    if config.rotate == "none":
        return
    refused = []  # (name, side, size, reason)
    for name, (rows, columns) in shapes.items():
        for side, size in (("input", columns), ("output", rows))[: 1 + (config.rotate == "both")]:
            try:
                split_size(size)
            except ValueError as exc:
                refused.append((name, side, size, exc))
    if refused:
        name, side, size, reason = refused[0]
        fix = "--rotate none" if any(r[1] == "input" for r in refused) else "--rotate input"
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise LlmbinError(f"--rotate {config.rotate}: {name} has {side} size {size}, which cannot be rotated "
                          f"({reason}){more}; use {fix}")


def rotate_problem(W: torch.Tensor, H: torch.Tensor, rotation: LayerRotation) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S·W·Tᵀ, T·H·Tᵀ)``; new tensors (``H`` may be shared with other layers)."""
    T, S = rotation.transforms(tuple(W.shape), W.device, torch.float32)
    W = T.apply(W.float())  # each row w -> T·w
    if S is not None:
        W = S.apply(W.T).T.contiguous()
    H = T.apply(T.apply(H.float()).T)  # rows of H: H·Tᵀ; rows of its transpose T·H: T·H·Tᵀ
    return W, (H + H.T) / 2  # symmetric to the last bit, as Cholesky-based methods expect
