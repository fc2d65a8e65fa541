"""``x @ Ŵᵀ`` with float32 activations and a quantized table (``packing.table``: 8- or 4-bit codes,
fp16 group scales). Small batches run the C++ kernel (``table_matvec_cpu.cpp``), which reads
each code once and widens it in registers; larger ones, or where it is unavailable (and on GPUs),
decode bands of rows with torch and multiply them with its GEMM.

torch has int8 and int4 weight-only CPU operators (``torch._weight_int8pack_mm``,
``torch._weight_int4pack_mm_for_cpu``), but on the 2-core AVX2 development machine they took 173
and 265 ms for Qwen2.5-1.5B's output matrix at batch 1, against 21 ms for llmbin's fp16 kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..packing.table import QuantTable
from .cpu import cpu_ops_ready, extension
from .tuning import TUNING

MATVEC_MAX_ROWS, BAND_BYTES = TUNING.half_max_rows, TUNING.band_bytes


def _kernel_serves(x2: Tensor, codes: Tensor, use_kernel: bool) -> bool:
    """Whether the C++ kernel (where built) serves this call: a CPU batch of at most ``MATVEC_MAX_ROWS`` rows."""
    return use_kernel and x2.is_cpu and codes.is_cpu and x2.shape[0] <= MATVEC_MAX_ROWS


def _table_linear_2d(x2: Tensor, codes: Tensor, scale: Tensor, bits: int, group: int, use_kernel: bool = True) -> Tensor:
    N, K = scale.shape[0], x2.shape[1]
    out = x2.new_empty(x2.shape[0], N)
    ext = extension() if _kernel_serves(x2, codes, use_kernel) else None
    if ext is not None:
        ext.table_linear(x2.contiguous(), codes.contiguous(), scale.contiguous(), bits, group, out)
        return out
    table = QuantTable(codes, scale, bits, group, (N, K))
    band = max(16, BAND_BYTES // (4 * K))
    for r0 in range(0, N, band):
        rows = slice(r0, r0 + band)
        torch.mm(x2, table.dense(x2.dtype, rows).T, out=out[:, rows])  # in place: no (B, band) copy
    return out


def _table_linear_fake(x, codes, scale, bits, group, use_kernel=True):
    return x.new_empty(x.shape[0], scale.shape[0], dtype=x.dtype)


# ``torch.ops.llmbin.table_linear``: as ``half.py`` defines ``half_linear`` (and ``ops.py`` says
# why): an operator, so that ``torch.compile`` keeps the kernel in its graph.
_LIB = torch.library.Library("llmbin", "FRAGMENT")
_LIB.define("table_linear(Tensor x, Tensor codes, Tensor scale, int bits, int group, bool use_kernel=True) -> Tensor")
_LIB.impl("table_linear", _table_linear_2d, "CPU")
_LIB.impl("table_linear", _table_linear_2d, "CUDA")
torch.library.register_fake("llmbin::table_linear", _table_linear_fake, lib=_LIB)

# ``torch.ops.llmbin_cpu.table_linear``: the C++ kernel as an operator whose CPU kernel the C++ module
# registers when it loads. A compiled graph calls it for small batches, with no Python between.
_CPU_LIB = torch.library.Library("llmbin_cpu", "FRAGMENT")
_CPU_LIB.define("table_linear(Tensor x, Tensor codes, Tensor scale, int bits, int group) -> Tensor")
torch.library.register_fake("llmbin_cpu::table_linear",
                            lambda x, codes, scale, bits, group: x.new_empty(x.shape[0], scale.shape[0]), lib=_CPU_LIB)


def table_linear(x: Tensor, table: QuantTable, use_kernel: bool = True) -> Tensor:
    """``x`` (..., K) float -> ``x @ Ŵᵀ`` (..., N) in ``x``'s dtype (the kernel serves float32 on the CPU)."""
    N, K = table.shape
    if x.shape[-1] != K:
        raise ValueError(f"table_linear: x has {x.shape[-1]} features, the table {K}")
    x2 = x.reshape(-1, K)
    use_kernel = use_kernel and x.dtype == torch.float32
    compiling = torch.compiler.is_compiling()
    if compiling and _kernel_serves(x2, table.codes, use_kernel) and cpu_ops_ready():
        out = torch.ops.llmbin_cpu.table_linear(x2, table.codes, table.scale, table.bits, table.group_size)
    else:
        out = (torch.ops.llmbin.table_linear if compiling else _table_linear_2d)(
            x2, table.codes, table.scale, table.bits, table.group_size, use_kernel)
    return out.view(*x.shape[:-1], N)
