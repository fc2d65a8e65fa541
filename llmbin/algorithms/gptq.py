"""The one GPTQ reconstruction loop (Frantar et al.), with the number format plugged in.

Columns are quantized left to right; each column's error, scaled by the inverse-Hessian
Cholesky factor, is fed back into the columns not yet quantized. Updates are applied lazily
per block of columns (the paper's "lazy batch" trick) so most of the work is one matmul.
"""
from __future__ import annotations

from typing import Callable

import torch

ColumnQuantizer = Callable[[torch.Tensor, int], torch.Tensor]
"""``(w_column (N,), column_index) -> quantized column (N,)``."""
BlockStart = Callable[[torch.Tensor, int], None]
"""``(W_block (N, b), first_column) -> None``: called with a block's weights as they stand when
the loop reaches it (all earlier blocks' feedback applied), so a format can fit per-block
parameters (group scales, salient columns) to the weights it will actually quantize."""


def gptq_reconstruct(
    W: torch.Tensor, Hinv_upper: torch.Tensor, quantize_column: ColumnQuantizer, blocksize: int = 128,
    begin_block: BlockStart | None = None,
) -> torch.Tensor:
    """Quantize ``W (N, K)`` column by column with error feedback; returns the quantized ``Q``."""
    return gptq_reconstruct_scored(W, Hinv_upper, quantize_column, blocksize, begin_block)[0]


def gptq_reconstruct_scored(
    W: torch.Tensor, Hinv_upper: torch.Tensor, quantize_column: ColumnQuantizer, blocksize: int = 128,
    begin_block: BlockStart | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gptq_reconstruct`, plus each row's error ``Σⱼ errⱼ²`` (N,) at no extra cost.

    By the OBS identity this is the row's ``(w − q) H (w − q)ᵀ`` for the damped ``H`` whose
    inverse Cholesky factor ``Hinv_upper`` is, so settings can be compared without forming H."""
    W = W.clone()
    Q = torch.zeros_like(W)
    row_error = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
    columns = W.shape[1]
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        W1 = W[:, start:end]
        Hinv1 = Hinv_upper[start:end, start:end]
        Err1 = torch.zeros_like(W1)
        if begin_block is not None:
            begin_block(W1.clone(), start)
        for i in range(end - start):
            w = W1[:, i]
            q = quantize_column(w, start + i)
            Q[:, start + i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        row_error += Err1.double().pow(2).sum(dim=1)
        W[:, end:] -= Err1 @ Hinv_upper[start:end, end:]
    return Q, row_error
