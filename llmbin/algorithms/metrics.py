"""Shared numeric metrics: Hessian-weighted reconstruction error and SQNR."""
from __future__ import annotations

import math

import torch


def hessian_weighted_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W-Q) H (W-Q)ᵀ)``: the layer-output error on the calibration inputs (up to a factor)."""
    E = (W - Q).to(torch.float64)
    return float(((E @ H.to(torch.float64)) * E).sum())


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (reference.double() - approx.double()).pow(2).sum().item()
    signal = reference.double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)
