"""Sign binarization ŵ = μ + α·s, s ∈ {-1, +1}, with μ and α fitted to the weights it binarizes."""
from __future__ import annotations

import torch


def fit_binary(W: torch.Tensor, keep: torch.Tensor, iters: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(μ, α)`` minimising ``Σ_keep (w - μ - α·sign(w - μ))²``.

    Only the entries in ``keep`` (the ones that will be binarized) count: including the
    salient or zeroed entries, as the reference PB-LLM code does, biases α towards zero.
    Alternates the closed-form 2-parameter least squares with re-choosing the signs until
    the signs stop changing (each step lowers the error, so this converges).
    """
    keep = keep.to(W.dtype)
    n = keep.sum(dim=1).clamp_min(1)
    mu = (W * keep).sum(dim=1) / n
    alpha = ((W - mu[:, None]).abs() * keep).sum(dim=1) / n
    previous = None
    for _ in range(iters):
        s = torch.where(W >= mu[:, None], 1.0, -1.0) * keep
        if previous is not None and torch.equal(s, previous):
            break
        previous = s
        s1, sw, w1 = s.sum(1), (s * W).sum(1), (W * keep).sum(1)
        det = n * n - s1 * s1
        ok = det > 1e-6 * n * n
        safe = det.where(ok, torch.ones_like(det))
        mu = torch.where(ok, (n * w1 - s1 * sw) / safe, mu)
        alpha = torch.where(ok, (n * sw - s1 * w1) / safe, alpha)
    return mu, alpha.clamp_min(0)


def binarize(w: torch.Tensor, mu: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return mu + alpha * torch.where(w >= mu, 1.0, -1.0).to(w.dtype)
