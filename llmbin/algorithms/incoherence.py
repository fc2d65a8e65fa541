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
from .levels import row_slices


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


ROTATE_CHUNK_BYTES = 64 << 20  # float32 rows (or columns) transformed at once


def _rows(T, x: torch.Tensor) -> torch.Tensor:
    """A new float32 ``x`` with each row ``v`` replaced by ``T·v``, in row chunks: the transform's
    Kronecker steps copy a chunk a few times, not the whole matrix (a 70B down_proj's is 3.3 GB)."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for rows in row_slices(x.shape[0], 4 * x.shape[1], ROTATE_CHUNK_BYTES):
        out[rows] = T.apply(x[rows].float())
    return out


def _columns_(T, x: torch.Tensor) -> torch.Tensor:
    """``x`` with each column ``v`` replaced by ``T·v``, in place, in column chunks."""
    for cols in row_slices(x.shape[1], 4 * x.shape[0], ROTATE_CHUNK_BYTES):
        x[:, cols] = T.apply(x[:, cols].T).T
    return x


def _symmetrized_(H: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``(H + Hᵀ) / 2`` in place, block pair by block pair (the same sums, bit for bit, without a copy)."""
    for i in range(0, H.shape[0], block):
        for j in range(i, H.shape[0], block):
            mean = (H[i:i + block, j:j + block] + H[j:j + block, i:i + block].T) / 2
            H[i:i + block, j:j + block] = mean
            H[j:j + block, i:i + block] = mean.T
    return H


def rotate_problem(W: torch.Tensor, H: torch.Tensor, rotation: LayerRotation) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S·W·Tᵀ, T·H·Tᵀ)``; new tensors (``H`` may be shared with other layers). Besides the
    caller's ``W`` and ``H``, one copy of each and a few chunks exist at the peak."""
    T, S = rotation.transforms(tuple(W.shape), W.device, torch.float32)
    W = _rows(T, W)  # each row w -> T·w
    if S is not None:
        W = _columns_(S, W)
    # rows of H: H·Tᵀ; then its columns: (T·H·Tᵀ)ᵀ, symmetric to the last bit as Cholesky-based methods expect
    return W, _symmetrized_(_columns_(T, _rows(T, H)))
