"""Seeded orthogonal transforms for incoherence processing (``--rotate``).

A rotated layer stores ``Ŵ' ≈ S·W·Tᵀ`` and computes ``y = Sᵀ·(Ŵ'·(T·x))``: the transforms spread
each row's (T) and each column's (S) outliers over all weights before binarization, and are
undone on the activations at run time. Only seeds are stored; the matrices are rebuilt here.

Construction ``hadamard-dct`` for a size ``n = 2^a · m`` (m odd)::

    T = (H_{2^a} / √2^a  ⊗  C_m) · diag(d)

* ``H`` is the Sylvester Hadamard matrix, applied as Kronecker factors of at most 64 × 64
  (a radix-64 fast Walsh–Hadamard transform: ``n · 64 · log₆₄ n`` multiply-adds in a few
  small matrix products, which BLAS and cuBLAS run faster than a radix-2 butterfly's
  ``log₂ n`` passes over memory);
* ``C_m`` is the orthonormal DCT-II of size m (1 when m = 1). Every entry of T then has
  magnitude at most ``√(2/n)``, as close to a Hadamard matrix's ``1/√n`` as any size allows:
  SmolLM2's 576 = 64·9 and 1536 = 512·3, Llama's 11008 = 256·43 have no Hadamard matrix of
  the Sylvester kind;
* ``d`` is a vector of random signs drawn from the seed (``torch.randint`` on the CPU
  generator: integers, so identical on every machine).

Index order is row-major: entry ``i = i₁·k₂·…·k_L + … + i_L`` of a vector is entry
``(i₁, …, i_L)`` of its view as a ``k₁ × … × k_L`` array, so the Kronecker product is
``torch.kron``'s.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import torch

CONSTRUCTION = "hadamard-dct"
MAX_HADAMARD_FACTOR = 64
MAX_ODD_FACTOR = 4096  # the DCT factor is dense; past this a size is refused rather than slow
SEED_BITS = 63  # a stored seed is counted as this many bits (plus one presence bit per side)


@dataclass(frozen=True)
class LayerRotation:
    """What a rotated layer stores: the construction and one seed per rotated side."""

    input_seed: int
    output_seed: int | None = None
    construction: str = CONSTRUCTION

    def metadata(self) -> dict:
        return {"construction": self.construction, "input_seed": self.input_seed, "output_seed": self.output_seed}

    @classmethod
    def from_metadata(cls, meta: dict | None) -> "LayerRotation | None":
        if meta is None:
            return None
        if meta.get("construction") != CONSTRUCTION:
            raise ValueError(f"unknown rotation construction {meta.get('construction')!r}; this llmbin builds "
                             f"{CONSTRUCTION!r}")
        out = meta.get("output_seed")
        return cls(int(meta["input_seed"]), None if out is None else int(out))

    def storage_bits(self) -> int:
        return 2 + SEED_BITS * (1 + (self.output_seed is not None))

    def transforms(self, shape: tuple[int, int], device=None, dtype=torch.float32):
        """``(T, S)`` for a weight of ``shape`` (N, K); ``S`` is None without an output seed."""
        N, K = shape
        T = OrthogonalTransform(K, self.input_seed, device, dtype)
        S = None if self.output_seed is None else OrthogonalTransform(N, self.output_seed, device, dtype)
        return T, S


def layer_seed(base_seed: int, key: str) -> int:
    """A per-layer seed from the run's seed and the layer's name (stable across processes,
    unlike ``hash``), so that no two layers share their random signs."""
    digest = int.from_bytes(hashlib.sha256(f"{base_seed}:{key}".encode()).digest()[:8], "little")
    return digest & ((1 << SEED_BITS) - 1)


def split_size(n: int) -> tuple[list[int], int]:
    """``n = Π hadamard_factors · m``: powers of two of at most 64, and the odd part m."""
    if n < 1:
        raise ValueError(f"cannot rotate a dimension of size {n}")
    m = n
    while m % 2 == 0:
        m //= 2
    if m > MAX_ODD_FACTOR:
        raise ValueError(f"size {n} = 2^{(n // m).bit_length() - 1} · {m}: its odd factor {m} is over "
                         f"{MAX_ODD_FACTOR}, too large for the dense DCT factor")
    a, factors = (n // m).bit_length() - 1, []
    step = MAX_HADAMARD_FACTOR.bit_length() - 1
    while a > 0:
        factors.append(1 << min(a, step))
        a -= min(a, step)
    return factors, m


@functools.lru_cache(maxsize=64)
def _hadamard(k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < k:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return (H / math.sqrt(k)).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _dct(m: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    k = torch.arange(m, dtype=torch.float64)[:, None]
    j = torch.arange(m, dtype=torch.float64)[None, :]
    C = torch.cos(math.pi * (2 * j + 1) * k / (2 * m)) * math.sqrt(2.0 / m)
    C[0] /= math.sqrt(2.0)
    return C.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=256)
def _signs(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64) * 2 - 1


def kronecker_transform(x: torch.Tensor, factors, signs: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``T·v`` (``transpose``: ``Tᵀ·v``) along the last dimension of ``x``, for
    ``T = (F_1 ⊗ … ⊗ F_L)·diag(signs)``: one small matrix product per factor, along its axis of
    ``v`` viewed as an ``F_1 × … × F_L`` array. The plain-torch form of the CPU kernel
    ``kernels/rotate_cpu.cpp``, which small batches use (``kernels.rotate``)."""
    if not transpose:
        x = x * signs
    if factors:
        shape = x.shape
        y = x.reshape(-1, *(M.shape[0] for M in factors))
        for axis, M in enumerate(factors, start=1):
            y = torch.movedim(torch.tensordot(y, M if transpose else M.T, dims=([axis], [0])), -1, axis)
        x = y.reshape(shape)
    return x * signs if transpose else x


class OrthogonalTransform:
    """``T`` of the module docstring for one size and seed, on one device and dtype."""

    def __init__(self, size: int, seed: int, device=None, dtype: torch.dtype = torch.float32):
        device = torch.device(device or "cpu")
        hadamard, odd = split_size(size)
        self.size, self.seed = size, seed
        self.factors = [_hadamard(k, device, dtype) for k in hadamard] + ([_dct(odd, device, dtype)] if odd > 1 else [])
        self.signs = _signs(size, seed).to(device=device, dtype=dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``T·v`` for every vector ``v`` along the last dimension of ``x``."""
        return kronecker_transform(x, self.factors, self.signs, transpose=False)

    def apply_transpose(self, x: torch.Tensor) -> torch.Tensor:
        """``Tᵀ·v`` (the inverse) for every vector along the last dimension of ``x``."""
        return kronecker_transform(x, self.factors, self.signs, transpose=True)

    def matrix(self) -> torch.Tensor:
        """Dense ``T`` (tests and small sizes only: n² entries)."""
        K = functools.reduce(torch.kron, self.factors) if self.factors else torch.ones(1, 1, dtype=self.signs.dtype,
                                                                                        device=self.signs.device)
        return K * self.signs
