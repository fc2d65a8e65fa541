"""``torch.ops.llmbin.packed_linear``: one operator for every packed layout, on CPU and GPU.

The operator takes a :class:`~llmbin.kernels.plan.KernelPlan` as the two lists of its fields
that ``plan.op_args()`` gives (its tensors, its integers) and returns ``x @ Ŵᵀ`` in float32. It
has a fake implementation (shapes only), so ``torch.compile`` and export can trace through it.
Implementations:

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

from .cpu import ISAS, cpu_ops_ready, extension
from .plan import PLAN_INTS, PLAN_TENSORS, KernelPlan, plan_decode
from .tuning import TUNING

# Bit-product work (batch × products) past which the band-decode + GEMM path wins, and the band
# size: the tuning setting's values (``tuning.py`` says where they were measured, and how to
# re-measure and override them).
MATVEC_MAX_WORK, LUT_MAX_WORK, BAND_BYTES = TUNING.matvec_max_work, TUNING.lut_max_work, TUNING.band_bytes


@functools.lru_cache(maxsize=None)
def _cpu_has_lut() -> bool:
    ext = extension()
    return ext is not None and "avx2-lut" in ext.available_isas()


@torch.compiler.assume_constant_result  # read while tracing, as a constant (a trace cannot enter the cache)
def _lut_available() -> bool:
    return _cpu_has_lut()


def _matvec(batch: int, n_bit: int, isa: int, tiles: Tensor) -> bool:
    """Whether the packed-bit matrix-vector kernel (not band decode + GEMM) serves this batch."""
    lut = isa == ISAS["avx2-lut"] or (isa == ISAS["auto"] and tiles.numel() > 0 and _lut_available())
    return batch * max(n_bit, 1) <= (LUT_MAX_WORK if lut else MATVEC_MAX_WORK)


def _packed_linear_cpu(x: Tensor, plan: KernelPlan, isa: int = 0) -> Tensor:
    ext = extension()
    x = x.float().contiguous()
    if ext is None:
        return x @ plan_decode(plan).T
    N, K = plan.shape
    tensors, ints = plan.op_args()
    out = x.new_empty(x.shape[0], N)
    if _matvec(x.shape[0], plan.n_bit_products, isa, plan.tiles):
        ext.packed_linear(x, tensors, ints, isa, out)
        return out
    band = max(16, BAND_BYTES // (4 * K) // 16 * 16)
    weights = x.new_empty(min(band, N), plan.planes.shape[2] * 8)
    for r0 in range(0, N, band):
        r1 = min(N, r0 + band)
        ext.decode_rows(tensors, ints, r0, r1, weights[: r1 - r0], isa)
        torch.mm(x, weights[: r1 - r0, :K].T, out=out[:, r0:r1])  # BLAS writes the band's columns in place: no copy
    return out


# The operator is defined on a ``torch.library.Library``, not with ``torch.library.custom_op``: that
# wrapper's Python bookkeeping costs about 30 us a call (measured: 33 us for an empty body with
# these arguments, 11 us here), which a compiled decode step pays for each of its hundreds of
# layers. The kernels have no backward: BinaryLinear sends autograd to the plain-torch path.
_LIB = torch.library.Library("llmbin", "FRAGMENT")
_LIB.define("packed_linear(Tensor x, Tensor[] plan_tensors, int[] plan_ints, int isa=0) -> Tensor")
_N_BIT_PRODUCTS, _TILES = PLAN_INTS.index("n_bit_products"), PLAN_TENSORS.index("tiles")


def packed_linear_op(x: Tensor, plan_tensors: list[Tensor], plan_ints: list[int], isa: int = 0) -> Tensor:
    """``x`` (B, K) -> float32 (B, N) for the plan ``KernelPlan.from_op_args(plan_tensors, plan_ints)``
    (``plan.op_args()`` gives them). ``isa`` picks the CPU path (0 = the default: AVX2 table
    lookup where the CPU has it; see ``cpu.ISAS``). The CPU implementation of ``torch.ops.llmbin.packed_linear``."""
    ext = extension()
    if ext is not None and x.dtype == torch.float32 and _matvec(x.shape[0], plan_ints[_N_BIT_PRODUCTS], isa,
                                                                 plan_tensors[_TILES]):
        return ext.linear(x, plan_tensors, plan_ints, isa)  # small batches: one C++ call, no plan object
    return _packed_linear_cpu(x, KernelPlan.from_op_args(plan_tensors, plan_ints), isa)


def _packed_linear_fake(x, plan_tensors, plan_ints, isa=0):
    N, K = plan_ints[PLAN_INTS.index("out_features")], plan_ints[PLAN_INTS.index("in_features")]
    torch._check(x.shape[-1] == K)
    return x.new_empty(x.shape[0], N, dtype=torch.float32)


def _packed_linear_cuda(x, plan_tensors, plan_ints, isa=0):
    from . import triton_gpu  # only now: CPU-only installs never import Triton

    plan = KernelPlan.from_op_args(plan_tensors, plan_ints)
    if triton_gpu.available() and not plan.salient_stream:  # BinaryLinear builds stream plans for the CPU only
        return triton_gpu.packed_linear(x, plan)
    _warn_no_triton()
    return x.float() @ plan_decode(plan).T


_LIB.impl("packed_linear", packed_linear_op, "CPU")
_LIB.impl("packed_linear", _packed_linear_cuda, "CUDA")
torch.library.register_fake("llmbin::packed_linear", _packed_linear_fake, lib=_LIB)


# ``torch.ops.llmbin_cpu.linear``: the small-batch C++ entry point (``ext.linear``: any leading shape,
# the result in ``x``'s dtype) as an operator of its own, whose CPU kernel the C++ module registers
# when it loads. A compiled graph calls it where ``packed_linear`` below finds a small batch while
# tracing; through ``llmbin::packed_linear`` each call would go back into Python (about 10 us).
_CPU_LIB = torch.library.Library("llmbin_cpu", "FRAGMENT")
_CPU_LIB.define("linear(Tensor x, Tensor[] plan_tensors, int[] plan_ints, int isa) -> Tensor")


def _cpu_linear_fake(x, plan_tensors, plan_ints, isa):
    return x.new_empty(*x.shape[:-1], plan_ints[PLAN_INTS.index("out_features")])


torch.library.register_fake("llmbin_cpu::linear", _cpu_linear_fake, lib=_CPU_LIB)


@functools.lru_cache(maxsize=None)
def _warn_no_triton() -> None:
    warnings.warn("llmbin: Triton is not installed, so packed layers on CUDA decode their weights with plain torch "
                  "(correct, not fast); pip install triton to get the GPU kernel.", stacklevel=3)


def packed_linear(x: Tensor, plan: KernelPlan, isa: str = "auto") -> Tensor:
    """``x @ Ŵᵀ`` for any leading shape of ``x``, in ``x``'s dtype."""
    small = x.is_cpu and _matvec(x.numel() // plan.in_features, plan.n_bit_products, ISAS[isa], plan.tiles)
    if x.is_cpu and not torch.compiler.is_compiling():
        # Eager CPU calls skip the dispatcher (its Python round trip costs more than a small
        # layer), and small batches go to C++ in one call.
        ext = extension()
        if ext is not None and small:
            return ext.linear(x, *plan.op_args(), ISAS[isa])
        y = _packed_linear_cpu(x.reshape(-1, x.shape[-1]), plan, ISAS[isa])
    elif small and cpu_ops_ready():
        return torch.ops.llmbin_cpu.linear(x, *plan.op_args(), ISAS[isa])  # traced: the C++ kernel, called directly
    else:
        y = torch.ops.llmbin.packed_linear(x.reshape(-1, x.shape[-1]), *plan.op_args(), ISAS[isa])
    return y.reshape(*x.shape[:-1], plan.out_features).to(x.dtype)
