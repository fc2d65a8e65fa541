"""A rotated layer's transforms of its activations (``packing.rotation``), as an operator.

At decode batches ``T·x`` is a handful of tiny matrix products (one per Kronecker factor) and the
copies that move each axis back, and their per-op cost exceeded the packed layer's own: on
Qwen2.5-1.5B's rotated 1.5-bit checkpoint, 8 ms of a 70 ms decode step went to them, besides the
compiled step's wrapper calling each. Small batches run the C++ transform (``rotate_cpu.cpp``),
one call per transform; larger ones, or where it is unavailable (and on GPUs), the torch form.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..packing.rotation import OrthogonalTransform, kronecker_transform
from .cpu import cpu_ops_ready, extension
from .tuning import TUNING

MAX_ROWS = TUNING.rotate_max_rows
_NO_ODD_FACTOR = torch.empty(0, 0)  # the kernel's "m = 1": made once, not per call


def _rotate_2d(x2: Tensor, factors: list[Tensor], signs: Tensor, transpose: bool, use_kernel: bool = True) -> Tensor:
    ext = extension() if use_kernel and x2.is_cpu and x2.dtype == torch.float32 else None
    if ext is None or x2.shape[0] > MAX_ROWS:
        return kronecker_transform(x2, factors, signs, transpose)
    hadamard, odd = _kernel_factors(factors, x2.shape[1])
    out = torch.empty_like(x2, memory_format=torch.contiguous_format)
    ext.kron_transform(x2.contiguous(), signs, hadamard, odd, transpose, out)
    return out


def _kernel_factors(factors: list[Tensor], n: int) -> tuple[int, Tensor]:
    """The kernel's description of a transform of size ``n``: the power of two ``h`` and the odd DCT
    factor (empty when there is none). rotation.py's construction: Hadamard factors of powers of two
    (together the Sylvester H_h), then the odd part's DCT factor, if any."""
    odd = factors[-1] if factors and factors[-1].shape[0] % 2 else _NO_ODD_FACTOR
    return n // max(1, odd.shape[0]), odd


def _rotate_fake(x, factors, signs, transpose, use_kernel=True):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ``torch.ops.llmbin.rotate``: an operator, so that ``torch.compile`` keeps one call in its graph
# where it would otherwise trace the products and copies (as ``half.py`` does for ``half_linear``).
_LIB = torch.library.Library("llmbin", "FRAGMENT")
_LIB.define("rotate(Tensor x, Tensor[] factors, Tensor signs, bool transpose, bool use_kernel=True) -> Tensor")
_LIB.impl("rotate", _rotate_2d, "CPU")
_LIB.impl("rotate", _rotate_2d, "CUDA")
torch.library.register_fake("llmbin::rotate", _rotate_fake, lib=_LIB)

# ``torch.ops.llmbin_cpu.rotate``: the C++ transform as an operator whose CPU kernel the C++ module
# registers when it loads. A compiled graph calls it for small batches, with no Python between.
_CPU_LIB = torch.library.Library("llmbin_cpu", "FRAGMENT")
_CPU_LIB.define("rotate(Tensor x, Tensor signs, int hadamard, Tensor odd, bool transpose) -> Tensor")
torch.library.register_fake("llmbin_cpu::rotate", lambda x, signs, hadamard, odd, transpose: _rotate_fake(
    x, [], signs, transpose), lib=_CPU_LIB)


def rotate(x: Tensor, transform: OrthogonalTransform, transpose: bool = False, use_kernel: bool = True) -> Tensor:
    """``transform.apply(x)`` (``transpose``: ``apply_transpose``) along ``x``'s last dimension:
    the C++ kernel for float32 batches of at most ``MAX_ROWS`` rows on the CPU, else torch's
    products per factor (which a compiled graph traces and fuses as it would without llmbin)."""
    n = transform.size
    if x.shape[-1] != n:
        raise ValueError(f"rotate: x has {x.shape[-1]} features, the transform {n}")
    x2 = x.reshape(-1, n)
    if not (use_kernel and x.is_cpu and x.dtype == torch.float32 and x2.shape[0] <= MAX_ROWS):
        return kronecker_transform(x, transform.factors, transform.signs, transpose)
    compiling = torch.compiler.is_compiling()
    if compiling and cpu_ops_ready():
        out = torch.ops.llmbin_cpu.rotate(x2, transform.signs, *_kernel_factors(transform.factors, n), transpose)
    else:
        out = (torch.ops.llmbin.rotate if compiling else _rotate_2d)(x2, transform.factors, transform.signs,
                                                                       transpose, use_kernel)
    return out.view(x.shape)
