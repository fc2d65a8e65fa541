"""``torch.ops.llmbin.packed_linear``: one operator for every packed layout, on CPU and GPU.

The operator takes a :class:`~llmbin.kernels.plan.KernelPlan`'s tensors and returns
``x @ Ŵᵀ`` in float32. It has a fake implementation (shapes only), so ``torch.compile`` and
export can trace through it. Implementations:

* CPU: the C++ kernel (``packed_matmul_cpu.cpp``). Small batches run the packed-bit
  matrix-vector kernel, which reads only the bits; larger batches expand bands of rows to fp32
  and multiply them with torch's GEMM, which is compute-bound there anyway.
* CUDA: the Triton kernel (``triton_gpu.py``, imported on first use), which expands bits to
  weight tiles in registers; without Triton installed, a one-time warning and the dense decode.
* Anywhere the compiled kernel is unavailable: the same dense plain-torch decode.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from .cpu import ISAS, extension
from .plan import KernelPlan, plan_decode

# Bit-product work grows with batch × products; past these the band-decode + GEMM path wins.
# On the 2-core EPYC the float path ties with it at batch 16 on 4096 × 4096; table lookup costs
# about a quarter as much per row and ties with fp32 GEMM near batch 128 on SmolLM2's layers.
MATVEC_MAX_WORK = 16
LUT_MAX_WORK = 96
BAND_BYTES = 4 << 20  # rows decoded per GEMM band: about this many fp32 bytes (stays in cache)


@functools.lru_cache(maxsize=None)
def _cpu_has_lut() -> bool:
    ext = extension()
    return ext is not None and "avx2-lut" in ext.available_isas()


def _matvec(batch: int, n_bit: int, isa: int, tiles: Tensor) -> bool:
    """Whether the packed-bit matrix-vector kernel (not band decode + GEMM) serves this batch."""
    lut = isa == ISAS["avx2-lut"] or (isa == ISAS["auto"] and tiles.numel() > 0 and _cpu_has_lut())
    return batch * max(n_bit, 1) <= (LUT_MAX_WORK if lut else MATVEC_MAX_WORK)


def _packed_linear_cpu(x: Tensor, planes, tiles, colw, prod_var, prod_mono, n_bit, coef, K, group_size, sal_rowptr, sal_col,
                      sal_val, sal_row, isa: int = 0) -> Tensor:
    args = (planes, tiles, colw, prod_var, prod_mono, n_bit, coef, K, group_size, sal_rowptr, sal_col, sal_val, sal_row)
    ext = extension()
    x = x.float().contiguous()
    if ext is None:
        return x @ plan_decode(KernelPlan.from_op_args(*args)).T
    N = planes.shape[1]
    out = x.new_empty(x.shape[0], N)
    if _matvec(x.shape[0], n_bit, isa, tiles):
        ext.packed_linear(x, *args, isa, out)
        return out
    band = max(16, BAND_BYTES // (4 * K) // 16 * 16)
    weights = x.new_empty(min(band, N), planes.shape[2] * 8)
    for r0 in range(0, N, band):
        r1 = min(N, r0 + band)
        ext.decode_rows(*args, r0, r1, weights[: r1 - r0], isa)
        torch.mm(x, weights[: r1 - r0, :K].T, out=out[:, r0:r1])  # BLAS writes the band's columns in place: no copy
    return out


@torch.library.custom_op("llmbin::packed_linear", mutates_args=(), device_types="cpu")
def packed_linear_op(x: Tensor, planes: Tensor, tiles: Tensor, colw: Tensor, prod_var: Tensor, prod_mono: Tensor, n_bit: int,
                     coef: Tensor, K: int, group_size: int, sal_rowptr: Tensor, sal_col: Tensor, sal_val: Tensor,
                     sal_row: Tensor, isa: int = 0) -> Tensor:
    """``x`` (B, K) -> float32 (B, N); the rest is ``KernelPlan.op_args()``. ``isa`` picks the CPU
    path (0 = the default: AVX2 table lookup where the CPU has it; see ``cpu.ISAS``)."""
    return _packed_linear_cpu(x, planes, tiles, colw, prod_var, prod_mono, n_bit, coef, K, group_size, sal_rowptr, sal_col,
                              sal_val, sal_row, isa)


@packed_linear_op.register_fake
def _(x, planes, tiles, colw, prod_var, prod_mono, n_bit, coef, K, group_size, sal_rowptr, sal_col, sal_val, sal_row, isa=0):
    torch._check(x.shape[-1] == K)
    return x.new_empty(x.shape[0], planes.shape[1], dtype=torch.float32)


@packed_linear_op.register_kernel("cuda")
def _(x, planes, tiles, colw, prod_var, prod_mono, n_bit, coef, K, group_size, sal_rowptr, sal_col, sal_val, sal_row, isa=0):
    from . import triton_gpu  # only now: CPU-only installs never import Triton

    plan = KernelPlan.from_op_args(planes, tiles, colw, prod_var, prod_mono, n_bit, coef, K, group_size, sal_rowptr, sal_col,
                                   sal_val, sal_row)
    if triton_gpu.available() and not plan.salient_stream:  # BinaryLinear builds stream plans for the CPU only
        return triton_gpu.packed_linear(x, plan)
    _warn_no_triton()
    return x.float() @ plan_decode(plan).T


@functools.lru_cache(maxsize=None)
def _warn_no_triton() -> None:
    warnings.warn("llmbin: Triton is not installed, so packed layers on CUDA decode their weights with plain torch "
                  "(correct, not fast); pip install triton to get the GPU kernel.", stacklevel=3)


def packed_linear(x: Tensor, plan: KernelPlan, isa: str = "auto") -> Tensor:
    """``x @ Ŵᵀ`` for any leading shape of ``x``, in ``x``'s dtype."""
    if x.is_cpu and not torch.compiler.is_compiling():
        # Eager CPU calls skip the dispatcher (its Python round trip costs more than a small
        # layer), and small batches go to C++ in one call.
        ext = extension()
        if ext is not None and _matvec(x.numel() // plan.shape[1], plan.n_bit_products, ISAS[isa], plan.tiles):
            return ext.linear(x, *plan.op_args(), ISAS[isa])
        y = _packed_linear_cpu(x.reshape(-1, x.shape[-1]), *plan.op_args(), ISAS[isa])
    else:
        y = packed_linear_op(x.reshape(-1, x.shape[-1]), *plan.op_args(), ISAS[isa])
    return y.reshape(*x.shape[:-1], plan.shape[0]).to(x.dtype)
