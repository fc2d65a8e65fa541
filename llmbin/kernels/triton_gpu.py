"""The GPU kernel behind ``llmbin::packed_linear``: Triton, imported only on first CUDA use.

It evaluates the plan's bit-product form (see ``plan.py``) tile by tile: each program owns
``BLOCK_N`` output rows and a slice of the batch, and for every ``BLOCK_K`` columns expands
the rows' bits to a float weight tile in registers (one byte load per 8 weights per plane),
then multiplies it with the activations (``tl.dot`` for batches of 16 or more, a broadcast
multiply-and-sum below). The dense weight never reaches memory. Salient corrections run as a
second kernel, one program per output row over its CSR list.

Without a GPU the same kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), which is
how the tests check them on CPU-only machines.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from .plan import KernelPlan


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether Triton is installed (the kernels need it on CUDA, or its interpreter on CPU)."""
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def bit_products(x_ptr, planes_ptr, colw_ptr, var_ptr, mono_ptr, coef_ptr, out_ptr, B, N, K, row_bytes, Kpad, NP, P,
                     G, group_size, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     USE_DOT: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        batch = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok, batch_ok = rows < N, batch < B
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            tile_ok = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_ptr + batch[:, None] * K + cols[None, :], mask=batch_ok[:, None] & col_ok[None, :], other=0.0)
            w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for k in range(NP):
                mono = tl.load(mono_ptr + k)
                var = tl.load(var_ptr + k)
                prod = tl.full((BLOCK_N, BLOCK_K), 1, dtype=tl.int32)
                for p in range(P):
                    if (mono >> p) & 1:
                        byte = tl.load(planes_ptr + (p * N + rows[:, None]) * row_bytes + cols[None, :] // 8,
                                       mask=tile_ok, other=0)
                        prod = prod & ((byte.to(tl.int32) >> (cols[None, :] % 8)) & 1)
                colw = tl.load(colw_ptr + var * Kpad + cols, mask=col_ok, other=0.0)
                coef = tl.load(coef_ptr + ((k * ((N + 15) // 16) + rows[:, None] // 16) * G + cols[None, :] // group_size)
                               * 16 + rows[:, None] % 16, mask=tile_ok, other=0.0)  # tile-major (plan.tile_coef)
                w += coef * colw[None, :] * prod.to(tl.float32)
            if USE_DOT:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        tl.store(out_ptr + batch[:, None] * N + rows[None, :], acc, mask=batch_ok[:, None] & row_ok[None, :])

    @triton.jit
    def salient(x_ptr, rowptr_ptr, col_ptr, val_ptr, srow_ptr, out_ptr, B, N, K, PARTS: tl.constexpr,
                CODES: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
        r = tl.program_id(0)
        batch = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        batch_ok = batch < B
        total = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for part in range(PARTS):  # codes: the row's b = 1 entries, then its b = 0 entries
            start = tl.load(rowptr_ptr + PARTS * r + part)
            end = tl.load(rowptr_ptr + PARTS * r + part + 1)
            for e0 in range(start, end, BLOCK_E):
                e = e0 + tl.arange(0, BLOCK_E)
                e_ok = e < end
                col = tl.load(col_ptr + e, mask=e_ok, other=0).to(tl.int32)
                if CODES:
                    scale = tl.load(srow_ptr + 4 * r + 2 * part)
                    base = tl.load(srow_ptr + 4 * r + 2 * part + 1)
                    val = scale * tl.load(val_ptr + e, mask=e_ok, other=0).to(tl.float32) + base
                else:
                    val = tl.load(val_ptr + e, mask=e_ok, other=0.0)
                val = tl.where(e_ok, val, 0.0)
                x = tl.load(x_ptr + batch[:, None] * K + col[None, :], mask=batch_ok[:, None] & e_ok[None, :], other=0.0)
                total += tl.sum(x * val[None, :], axis=1)
        out = out_ptr + batch * N + r
        tl.store(out, tl.load(out, mask=batch_ok, other=0.0) + total, mask=batch_ok)

    return triton, bit_products, salient


def packed_linear(x: Tensor, plan: KernelPlan, out: Tensor | None = None) -> Tensor:
    """``x`` (B, K) -> float32 (B, N) on the plan's device (CUDA, or CPU under the interpreter).
    ``out``, if given, is a contiguous float32 (B, N) buffer that every element is written to."""
    triton, bit_products, salient = _kernels()
    N, K = plan.shape
    x = x.float().contiguous()
    B = x.shape[0]
    if out is None:
        out = torch.empty(B, N, dtype=torch.float32, device=x.device)
    if out.shape != (B, N) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 ({B}, {N}) tensor")
    if B == 0:
        return out
    use_dot = B >= 16
    block_b = 16 if use_dot else triton.next_power_of_2(B) if B <= 4 else 4
    block_n, block_k = (64, 64) if use_dot else (32, 64)
    grid = (triton.cdiv(N, block_n), triton.cdiv(B, block_b))
    bit_products[grid](x, plan.planes, plan.colw, plan.prod_var, plan.prod_mono, plan.coef, out, B, N, K,
                       plan.planes.shape[2], plan.colw.shape[1], plan.coef.shape[0], plan.planes.shape[0],
                       plan.num_groups, plan.group_size, BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k,
                       USE_DOT=use_dot)
    if plan.sal_rowptr.numel():
        codes = plan.sal_row.numel() > 0
        salient[(N, triton.cdiv(B, block_b))](x, plan.sal_rowptr, plan.sal_col, plan.sal_val,
                                              plan.sal_row if codes else plan.sal_val, out, B, N, K,
                                              PARTS=2 if codes else 1, CODES=codes, BLOCK_B=block_b, BLOCK_E=64)
    return out
