"""``torch.ops.llmbin.packed_linear``: one operator for every packed layout, on CPU and GPU.

The operator takes a :class:`~llmbin.kernels.plan.KernelPlan`'s tensors and returns
``x @ Ŵᵀ`` in float32. It has a fake implementation (shapes only), so ``torch.compile`` and
export can trace through it. Implementations:

* CPU: the C++ kernel (``packed_matmul_cpu.cpp``). Small batches run the packed-bit
  matrix-vector kernel, which reads only the bits; larger batches expand bands of rows to fp32
  and multiply them with torch's GEMM, which is compute-bound there anyway.
* CUDA: the Triton kernel (``packed_matmul_triton.py``), imported only when a CUDA tensor
  arrives.
* Anywhere the compiled kernel is unavailable: the plan decoded densely with plain torch.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .cpu import ISAS, extension
from .plan import KernelPlan, plan_decode

# Bit-product work grows with batch × products; past this the band-decode + GEMM path wins
# (see eval/kernel_benchmark.py for the crossover on this machine).
MATVEC_MAX_WORK = 16
BAND_BYTES = 4 << 20  # rows decoded per GEMM band: about this many fp32 bytes (stays in cache)


def _plan_from_args(planes, colw, prod_var, prod_mono, n_bit, coef, K, group_size, rowptr, scol, sval) -> KernelPlan:
    return KernelPlan((planes.shape[1], K), group_size, planes, colw, prod_var, prod_mono, n_bit, coef, rowptr, scol,
                      sval)


@torch.library.custom_op("llmbin::packed_linear", mutates_args=(), device_types="cpu")
def packed_linear_op(x: Tensor, planes: Tensor, colw: Tensor, prod_var: Tensor, prod_mono: Tensor, n_bit: int,
                     coef: Tensor, K: int, group_size: int, sal_rowptr: Tensor, sal_col: Tensor, sal_val: Tensor,
                     isa: int = 0) -> Tensor:
    """``x`` (B, K) -> float32 (B, N). ``isa`` picks the CPU path (0 = best available)."""
    args = (planes, colw, prod_var, prod_mono, n_bit, coef, K, group_size, sal_rowptr, sal_col, sal_val)
    ext = extension()
    x = x.float()
    if ext is None:
        return x @ plan_decode(_plan_from_args(*args)).T
    N = planes.shape[1]
    out = x.new_empty(x.shape[0], N)
    if x.shape[0] * max(n_bit, 1) <= MATVEC_MAX_WORK:
        ext.packed_linear(x, *args, isa, out)
        return out
    band = max(16, BAND_BYTES // (4 * K) // 16 * 16)
    weights = x.new_empty(min(band, N), planes.shape[2] * 8)
    for r0 in range(0, N, band):
        r1 = min(N, r0 + band)
        ext.decode_rows(*args, r0, r1, weights[: r1 - r0], isa)
        out[:, r0:r1] = x @ weights[: r1 - r0, :K].T
    return out


@packed_linear_op.register_fake
def _(x, planes, colw, prod_var, prod_mono, n_bit, coef, K, group_size, sal_rowptr, sal_col, sal_val, isa=0):
    torch._check(x.shape[-1] == K)
    return x.new_empty(x.shape[0], planes.shape[1], dtype=torch.float32)


@packed_linear_op.register_kernel("cuda")
def _(x, planes, colw, prod_var, prod_mono, n_bit, coef, K, group_size, sal_rowptr, sal_col, sal_val, isa=0):
    args = (planes, colw, prod_var, prod_mono, n_bit, coef, K, group_size, sal_rowptr, sal_col, sal_val)
    triton_kernel = _triton()
    if triton_kernel is None:
        return x.float() @ plan_decode(_plan_from_args(*args)).T
    return triton_kernel(x.float(), _plan_from_args(*args))


@functools.lru_cache(maxsize=None)
def _triton():
    try:
        from .packed_matmul_triton import packed_linear_triton
    except ImportError:
        return None
    return packed_linear_triton


def packed_linear(x: Tensor, plan: KernelPlan, isa: str = "auto") -> Tensor:
    """``x @ Ŵᵀ`` for any leading shape of ``x``, in ``x``'s dtype."""
    lead = x.shape[:-1]
    y = packed_linear_op(x.reshape(-1, x.shape[-1]), plan.planes, plan.colw, plan.prod_var, plan.prod_mono,
                         plan.n_bit_products, plan.coef, plan.shape[1], plan.group_size, plan.sal_rowptr,
                         plan.sal_col, plan.sal_val, ISAS[isa])
    return y.reshape(*lead, plan.shape[0]).to(x.dtype)
