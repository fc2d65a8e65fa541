"""Level codes ``ŵ = μ + Σ_p α_p·s_p`` with scales per row or per group of columns, through the
GPTQ loop. Plain GPTQ (a uniform grid) and DB-LLM's dual binarization (a free 4-level code)
differ only in how a group's scales are fitted and how a column picks its level."""
from __future__ import annotations

from typing import Callable

import torch

from ..packing.packed_weight import PackedWeight
from .gptq import gptq_reconstruct

GroupFit = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``W_group (N, g) -> (μ (N,), α (P, N))``, already rounded to what the checkpoint stores."""
Nearest = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(w (N,), μ (N,), α (P, N)) -> signs (P, N)`` of ±1 choosing the level for each weight."""


def reconstruct_levels(W: torch.Tensor, U: torch.Tensor, planes: int, group_size: int, blocksize: int,
                       fit: GroupFit, nearest: Nearest, pow2_planes: bool = False) -> PackedWeight:
    """With ``pow2_planes`` the fitted α must be ``α₀·2^p`` and only ``α₀`` is stored. Scales per row (``group_size`` 0, fitted to the whole matrix up front, as GPTQ does) or per
    group (fitted when the loop reaches the group, with earlier columns' feedback applied)."""
    N, K = W.shape
    gs = group_size or K
    G = -(-K // gs)
    mu, alpha = W.new_zeros(N, G), W.new_zeros(planes, N, G)
    bits = torch.zeros(planes, N, K, dtype=torch.bool, device=W.device)

    def begin_block(W1: torch.Tensor, start: int) -> None:
        g = start // gs
        mu[:, g], alpha[:, :, g] = fit(W1)

    def quantize_column(w: torch.Tensor, j: int) -> torch.Tensor:
        g = j // gs
        signs = nearest(w, mu[:, g], alpha[:, :, g])
        bits[:, :, j] = signs > 0
        return mu[:, g] + (alpha[:, :, g] * signs).sum(0)

    if group_size:
        gptq_reconstruct(W, U, quantize_column, group_size, begin_block)
    else:
        begin_block(W, 0)
        gptq_reconstruct(W, U, quantize_column, blocksize)
    return PackedWeight.from_codes(bits, alpha[:1] if pow2_planes else alpha, mu[None], gs, pow2_planes=pow2_planes)
