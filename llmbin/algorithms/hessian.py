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


def prepare_hessian(W: torch.Tensor, H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(W, H)`` with dead inputs zeroed and ``percdamp * mean(diag H)`` added to the diagonal.

    A dead input (never non-zero in calibration) has ``H_jj = 0``; its weights cannot
    affect the output on calibration data, so they are zeroed and ``H_jj`` set to 1.
    """
    H = H.clone()
    W = W.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    return W, H


def inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``), as the GPTQ loop consumes it."""
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        Hinv = torch.cholesky_inverse(L)
        del L  # K×K each: at K = 28672 (70B down_proj) every copy is 3.3 GB
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        del Hinv
    if info.item() != 0:
        raise LlmbinError(
            "the layer Hessian is not positive definite; raise --percdamp (e.g. 0.1) or use more calibration samples"
        )
    return U
