"""``x @ Wᵀ`` with float32 activations and a 16-bit (bf16 or fp16) weight, widened exactly.

Every bf16 and fp16 number is an fp32 number, so a float layer the checkpoint stores in 16 bits
(the lm_head) can be served at fp32 without an fp32 copy: half the bytes per decoded token and
half the memory, the same products up to summation order. Small batches run the C++ kernel
(``half_matvec_cpu.cpp``), which widens in registers; larger ones, or where it is unavailable,
widen bands of rows with torch and multiply them with its GEMM.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .cpu import extension
from .tuning import TUNING

HALF_DTYPES = (torch.bfloat16, torch.float16)
# Batches the kernel serves (past them the weight is read once per band anyway and GEMM wins), and
# the band size: the tuning setting's values (see ``tuning.py``).
MATVEC_MAX_ROWS, BAND_BYTES = TUNING.half_max_rows, TUNING.band_bytes


def _half_linear_2d(x2: Tensor, weight: Tensor, use_kernel: bool = True) -> Tensor:
    N, K = weight.shape
    out = x2.new_empty(x2.shape[0], N)
    ext = extension() if use_kernel and x2.is_cpu and weight.is_cpu else None
    if ext is not None and x2.shape[0] <= MATVEC_MAX_ROWS:
        ext.half_linear(x2.contiguous(), weight.contiguous(), out)
    else:
        band = max(16, BAND_BYTES // (4 * K))
        for r0 in range(0, N, band):
            torch.mm(x2, weight[r0:r0 + band].float().T, out=out[:, r0:r0 + band])  # in place: no (B, band) copy
    return out


def _half_linear_fake(x, weight, use_kernel=True):
    torch._check(x.shape[-1] == weight.shape[1])
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


# ``torch.ops.llmbin.half_linear``: :func:`half_linear` as an operator (on a Library, as ``ops.py``
# defines ``packed_linear`` and says why), so that ``torch.compile`` keeps the kernel in its graph;
# a pybind call would break the graph there.
_LIB = torch.library.Library("llmbin", "FRAGMENT")
_LIB.define("half_linear(Tensor x, Tensor weight, bool use_kernel=True) -> Tensor")
_LIB.impl("half_linear", _half_linear_2d, "CPU")
torch.library.register_fake("llmbin::half_linear", _half_linear_fake, lib=_LIB)


def half_linear(x: Tensor, weight: Tensor, use_kernel: bool = True) -> Tensor:
    """``x`` (..., K) float32, ``weight`` (N, K) bf16 or fp16 -> float32 (..., N)."""
    if x.dtype != torch.float32 or weight.dtype not in HALF_DTYPES:
        raise TypeError(f"half_linear takes float32 activations and a bf16/fp16 weight, not {x.dtype} and {weight.dtype}")
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    # eager calls skip the dispatcher (its round trip costs more than a small layer); traced ones need the operator
    compiling = torch.compiler.is_compiling()
    out = (torch.ops.llmbin.half_linear if compiling else _half_linear_2d)(x2, weight, use_kernel)
    return out.view(*x.shape[:-1], N)
