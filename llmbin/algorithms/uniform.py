"""GPTQ (Frantar et al.) with an asymmetric uniform ``bits``-bit grid, stored as bit planes.

A grid ``ŵ = s·(q − z)``, ``q ∈ [0, 2^b − 1]``, is ``μ + Σ_p α_p·(2·bit_p(q) − 1)`` with
``α_p = s·2^(p−1)`` and ``μ = s·((2^b − 1)/2 − z)``: the same planes-and-scales layout as the
binary methods, so one kernel serves them all; ``pow2_planes`` stores the one step, not b scales.
"""
from __future__ import annotations

import torch

from ..config import GPTQConfig
from ..packing.packed_weight import PackedWeight, stored_float
from .grouped import reconstruct_levels
from .hessian import prepared_inverse


def uniform_grid(W: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's min–max grid per row (range widened to include 0, integer zero point), as ``(μ, α)``
    rounded to fp16 exactly as stored."""
    qmax = 2**bits - 1
    lo, hi = W.amin(dim=1).clamp_max(0), W.amax(dim=1).clamp_min(0)
    step = stored_float((hi - lo) / qmax)
    step = torch.where(step > 0, step, torch.ones_like(step))
    zero = torch.round(-lo / step)
    mu = stored_float(step * (qmax / 2 - zero))
    return mu, torch.stack([step * 2 ** (p - 1) for p in range(bits)])


def round_to_grid(w: torch.Tensor, mu: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Signs of the nearest grid level: round, clamp, split the integer into bit planes."""
    bits = alpha.shape[0]
    qmax = 2**bits - 1
    q = torch.clamp(torch.round((w - mu) / (2 * alpha[0]) + qmax / 2), 0, qmax).long()
    return torch.stack([((q >> p) & 1) * 2.0 - 1 for p in range(bits)])


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, config: GPTQConfig) -> PackedWeight:
    W, U = prepared_inverse(W.float(), H.float(), config.percdamp)
    return reconstruct_levels(W, U, config.bits, config.group_size, config.blocksize,
                              lambda Wg: uniform_grid(Wg, config.bits), round_to_grid, pow2_planes=True)
