"""Quantized tables: the output matrix and the token embedding in 8 or 4 bits, with group scales.

A checkpoint keeps the float layers outside the blocks in fp16. For a large vocabulary they are
most of what decode reads (Qwen2.5-1.5B's output matrix: 467 MB per token in fp16, against about
340 MB for its 28 blocks binarized at 2 bits). A table stores instead, for each row ``r`` and
group ``g`` of ``group_size`` columns, one fp16 scale and symmetric integer codes:

    Ŵ[r, c] = scale[r, c // group_size] · q[r, c]

* 8 bits: ``q`` in −127…127, stored as int8 ``(N, K)`` (llama.cpp's Q8_0 is this with groups of 32);
* 4 bits: ``q`` in −8…7, stored two per byte, low nibble first, as ``q + 8`` (uint8 ``(N, ⌈K/2⌉)``).

Stored names: the codes as ``weight`` (the name the float table had, so that a tied output
matrix stays tied to the embedding, and a reader that does not know the format meets an integer
tensor where it expects floats and refuses it) and the scales as ``weight_scale``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .packed_weight import STORAGE_DTYPE

TABLE_KIND = "table"  # the ``kind`` of a table's description in the checkpoint header
TABLE_BITS = (8, 4)
CODES_NAME, SCALE_NAME = "weight", "weight_scale"
_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # 4-bit scale candidates, as fractions of absmax / 7


def _qmax(bits: int) -> int:
    return 127 if bits == 8 else 7


@dataclass
class QuantTable:
    codes: torch.Tensor  # int8 (N, K), or uint8 (N, ⌈K/2⌉) nibbles
    scale: torch.Tensor  # fp16 (N, ⌈K / group_size⌉)
    bits: int
    group_size: int
    shape: tuple[int, int]

    @classmethod
    def quantize(cls, W: torch.Tensor, bits: int, group_size: int) -> "QuantTable":
        """Round-to-nearest codes for ``W (N, K)``, each group's scale the fp16 one of least squared
        error: absmax / qmax for 8 bits, the best of a few shrunk scales for 4 (clipping the largest
        value a little buys finer steps for the rest). Rows are done in slices: a 151,936-row table
        never has a float32 copy besides ``W``."""
        check_table_options(bits, group_size, tuple(W.shape))
        N, K = W.shape
        G = -(-K // group_size)
        codes = torch.empty(N, K, dtype=torch.int8, device=W.device)
        scale = torch.empty(N, G, dtype=STORAGE_DTYPE, device=W.device)
        for r0 in range(0, N, 4096):
            rows = W[r0:r0 + 4096].float()
            padded = torch.nn.functional.pad(rows, (0, G * group_size - K)).view(rows.shape[0], G, group_size)
            absmax = padded.abs().amax(-1)
            best_q, best_s, best_err = None, None, None
            for shrink in (_SHRINKS if bits == 4 else (1.0,)):
                s = (absmax * shrink / _qmax(bits)).to(STORAGE_DTYPE)
                if shrink == 1.0:  # rounded down to fp16, absmax would clip: the next fp16 up keeps it
                    s = torch.where(s.float() * _qmax(bits) < absmax, torch.nextafter(s, s.new_tensor(float("inf"))), s)
                s = s.float()
                s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero group: any scale, codes 0
                q = torch.clamp(torch.round(padded / s[..., None]), -_qmax(bits) - (bits == 4), _qmax(bits))
                err = ((q * s[..., None] - padded) ** 2).sum(-1)
                if best_err is None:
                    best_q, best_s, best_err = q, s, err
                else:
                    better = err < best_err
                    best_q = torch.where(better[..., None], q, best_q)
                    best_s, best_err = torch.where(better, s, best_s), torch.minimum(err, best_err)
            codes[r0:r0 + 4096] = best_q.view(rows.shape[0], -1)[:, :K].to(torch.int8)
            scale[r0:r0 + 4096] = best_s.to(STORAGE_DTYPE)
        return cls(_pack_nibbles(codes) if bits == 4 else codes, scale, bits, group_size, (N, K))

    def int_codes(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """The integer codes of ``rows`` as int8 ``(n, K)``."""
        codes = self.codes[rows]
        return codes if self.bits == 8 else _unpack_nibbles(codes, self.shape[1])

    def dense(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """``Ŵ[rows]`` in ``dtype`` (the embedding's lookup, and the reference for the kernel)."""
        q = self.int_codes(rows).to(dtype)
        scale = self.scale[rows].to(dtype).repeat_interleave(self.group_size, dim=-1)[..., : self.shape[1]]
        return q * scale

    def storage_bits(self) -> int:
        return 8 * (self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size())

    def metadata(self) -> dict:
        return {"kind": TABLE_KIND, "bits": self.bits, "group_size": self.group_size, "shape": list(self.shape)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {CODES_NAME: self.codes, SCALE_NAME: self.scale}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], layout: dict) -> "QuantTable":
        """The table a checkpoint describes (``layout``, from :meth:`metadata`) and stores; a
        mismatch raises ``ValueError`` naming it."""
        bits, group_size, shape = layout.get("bits"), layout.get("group_size"), tuple(layout.get("shape") or ())
        check_table_options(bits, group_size, shape)
        N, K = shape
        codes, scale = tensors.get(CODES_NAME), tensors.get(SCALE_NAME)
        if codes is None or scale is None:
            raise ValueError(f"a {bits}-bit table needs {CODES_NAME} and {SCALE_NAME}")
        want = ((N, K), torch.int8) if bits == 8 else ((N, -(-K // 2)), torch.uint8)
        if (tuple(codes.shape), codes.dtype) != want:
            raise ValueError(f"{CODES_NAME} is {codes.dtype} {tuple(codes.shape)}, a {bits}-bit {N} x {K} table "
                             f"stores {want[1]} {want[0]}")
        if (tuple(scale.shape), scale.dtype) != ((N, -(-K // group_size)), STORAGE_DTYPE):
            raise ValueError(f"{SCALE_NAME} is {scale.dtype} {tuple(scale.shape)}, expected {STORAGE_DTYPE} "
                             f"{(N, -(-K // group_size))}")
        return cls(codes, scale, bits, group_size, shape)


def check_table_options(bits, group_size, shape) -> None:
    if bits not in TABLE_BITS:
        raise ValueError(f"a table has 8 or 4 bits, not {bits!r}")
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"a table's group size must be an even number of columns, not {group_size!r}")
    if len(shape) != 2 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"a table's shape must be two positive sizes, not {shape!r}")


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes −8…7 ``(N, K)`` -> uint8 ``(N, ⌈K/2⌉)``: column ``2j`` in the low nibble, ``2j+1`` high."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[1] % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=8)  # a zero code in the unused half
    return u[:, 0::2] | (u[:, 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor, K: int) -> torch.Tensor:
    low, high = (packed & 15).to(torch.int8) - 8, (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).flatten(-2)[..., :K]
