"""Hessian of the layer-wise reconstruction objective, H = 2 X Xᵀ / n, and its preparation."""
from __future__ import annotations

import torch

from ..errors import LlmbinError


def accumulate_hessian(H: torch.Tensor, nsamples: int, X: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold a batch of inputs ``X (..., K)`` into the running mean ``H = 2/n Σ x xᵀ``."""
    X = X.reshape(-1, X.shape[-1]).to(H.dtype)
    count = X.shape[0]
    total = nsamples + count
    H.mul_(nsamples / total)
    X = X * (2.0 / total) ** 0.5
    H.addmm_(X.t(), X)
    return H, total


SYMMETRIC_BLOCK = 512  # rows of S per product in add_outer_products


def add_outer_products(S: torch.Tensor, X: torch.Tensor) -> int:
    """``S += Σ x xᵀ`` over the rows ``x`` of ``X (..., K)``, in ``S``'s dtype; returns the number of rows.
    The driver sums these per chunk of windows and scales the total by ``2/n`` once, so the sum's
    order is fixed whatever the number of processes.

    ``S`` is symmetric, so only its upper block triangle is computed (bands of
    :data:`SYMMETRIC_BLOCK` rows) and mirrored: at K = 8960 (Qwen2.5-1.5B's down_proj, the block's
    costliest Hessian, 2048 rows) 1.59 s against 2.21 s for one full product on the 2-core
    development machine, the same values there, and exactly symmetric."""
    X = X.reshape(-1, X.shape[-1]).to(S.dtype)
    K = X.shape[1]
    for i in range(0, K, SYMMETRIC_BLOCK):
        band = slice(i, min(i + SYMMETRIC_BLOCK, K))
        S[band, i:].addmm_(X[:, band].t(), X[:, i:])
    for i in range(0, K, SYMMETRIC_BLOCK):  # the lower triangle, each band's part and the bands left of it
        band = slice(i, min(i + SYMMETRIC_BLOCK, K))
        diagonal = S[band, band]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).t())
        S[band, :i] = S[:i, band].t()
    return X.shape[0]


def damped_hessian(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """A copy of ``H`` with dead inputs' ``H_jj`` set to 1 and ``percdamp * mean(diag H)`` added to the diagonal.

    A dead input (never non-zero in calibration) has ``H_jj = 0``; its weights cannot affect
    the output on calibration data (:func:`prepare_hessian` zeroes them)."""
    return damped_hessian_(H.clone(), percdamp)


def damped_hessian_(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """:func:`damped_hessian` in place, for an ``H`` nobody else holds (a rotated copy)."""
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    return H


def prepare_hessian(W: torch.Tensor, H: torch.Tensor, percdamp: float,
                    in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(W, H)`` with dead inputs zeroed in ``W`` and ``H`` damped (:func:`damped_hessian`,
    or :func:`damped_hessian_` with ``in_place``: one ``K × K`` copy fewer)."""
    W = W.clone()
    W[:, torch.diag(H) == 0] = 0.0
    return W, (damped_hessian_ if in_place else damped_hessian)(H, percdamp)


def prepared_inverse(W: torch.Tensor, H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, U)``: :func:`prepare_hessian`'s ``W`` and the :func:`inverse_cholesky` factor of its ``H``,
    without keeping the damped ``H``: besides the caller's ``H``, at most two ``K × K`` matrices
    exist at once (a 70B down_proj's are 3.3 GB each). A method that needs the damped ``H`` again
    (a scale refit) recomputes it with :func:`damped_hessian`."""
    W = W.clone()
    W[:, torch.diag(H) == 0] = 0.0
    return W, inverse_cholesky(H, percdamp)


def act_order(H: torch.Tensor) -> torch.Tensor:
    """GPTQ's activation order: input columns by decreasing ``H_jj``, so the columns whose error
    costs most are quantized first, while the most later columns remain to absorb their error.
    Stable, so equal diagonals keep their order and the permutation is reproducible."""
    return torch.argsort(torch.diag(H), descending=True, stable=True)


def permute_hessian(H: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``H[perm][:, perm]`` as one new ``K × K`` matrix: the columns are permuted in place in row
    chunks, so no second full copy exists (a 70B down_proj's ``H`` is 3.3 GB)."""
    out = H.index_select(0, perm)
    for start in range(0, out.shape[0], 1024):
        out[start:start + 1024] = out[start:start + 1024].index_select(1, perm)
    return out


def inverse_cholesky(H: torch.Tensor, percdamp: float | None = None) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``), as the GPTQ loop consumes it; with
    ``percdamp``, of :func:`damped_hessian`'s copy of ``H``, which lives only until it is factored."""
    L, info = torch.linalg.cholesky_ex(H if percdamp is None else damped_hessian(H, percdamp))
    if info.item() == 0:
        Hinv = torch.cholesky_inverse(L)
        del L  # each is K × K: drop every one as soon as the next exists
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        del Hinv
    if info.item() != 0:
        raise LlmbinError(
            "the layer Hessian is not positive definite; raise --percdamp (e.g. 0.1) or use more calibration samples"
        )
    return U
