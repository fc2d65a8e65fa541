"""Bit packing: 1-bit planes and n-bit codes stored as bit planes.

Bit order (format version 1): along the last dimension, element ``8*j + i`` lives in
bit ``i`` (least significant first) of byte ``j``. Rows are zero-padded to a multiple of
64 bits, so a packed row can be read as little-endian uint64 words by a kernel.
An n-bit code stream is stored as n such planes, plane ``p`` holding bit ``p`` of every code.
"""
from __future__ import annotations

import torch

ROW_ALIGN_BITS = 64
_SHIFTS = torch.arange(8, dtype=torch.uint8)


def packed_row_bytes(length: int, align_bits: int = ROW_ALIGN_BITS) -> int:
    return -(-length // align_bits) * align_bits // 8


def pack_bits(bits: torch.Tensor, align_bits: int = ROW_ALIGN_BITS) -> torch.Tensor:
    """Pack a bool/0-1 tensor ``(..., K)`` into uint8 ``(..., packed_row_bytes(K))``."""
    *lead, k = bits.shape
    nbytes = packed_row_bytes(k, align_bits)
    padded = torch.zeros(*lead, nbytes * 8, dtype=torch.uint8, device=bits.device)
    padded[..., :k] = bits.to(torch.uint8)
    padded = padded.view(*lead, nbytes, 8) << _SHIFTS.to(bits.device)
    return padded.sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``(..., B)`` -> bool ``(..., length)``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed bits must be uint8, got {packed.dtype}")
    if packed.shape[-1] * 8 < length:
        raise ValueError(f"{packed.shape[-1]} bytes cannot hold {length} bits")
    bits = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
    return bits.flatten(-2)[..., :length].bool()


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack a 1-D stream of unsigned ``nbits``-bit codes as ``(nbits, bytes)`` bit planes."""
    if codes.dim() != 1:
        raise ValueError("pack_codes expects a 1-D tensor")
    codes = codes.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= 1 << nbits):
        raise ValueError(f"codes do not fit in {nbits} bits")
    planes = torch.stack([(codes >> p) & 1 for p in range(nbits)]) if nbits else codes.new_zeros(0, 0)
    return pack_bits(planes, align_bits=8)


def unpack_codes(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``(nbits, bytes)`` planes -> int64 codes ``(count,)``."""
    planes = unpack_bits(packed, count).to(torch.int64)
    weights = (1 << torch.arange(planes.shape[0], device=packed.device)).unsqueeze(1)
    return (planes * weights).sum(dim=0)
