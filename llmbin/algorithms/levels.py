"""Multi-plane binary codes ``ŵ = μ + Σ_p α_p·s_p``, ``s_p ∈ {−1, +1}``, per row.

With P planes a row has 2^P levels. PB-LLM and BiLLM's non-salient part use P = 1; BiLLM's
residual (salient) binarization and DB-LLM's dual binarization use P = 2. Here are the codes'
levels, nearest-level signs and closed-form initial scales; refining the scales (ARB-LLM's
alternating refinement, Lloyd's algorithm on a constrained codebook) is in ``algorithms.scales``.
"""
from __future__ import annotations

import itertools

import torch


def sign_patterns(P: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """All ``2^P`` sign combinations, ``(2^P, P)`` of ±1; pattern ``i`` has plane ``p`` = bit ``p`` of ``i``."""
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=P)), dtype=dtype, device=device).flip(-1)


def argmin0(d: torch.Tensor) -> torch.Tensor:
    """``d.argmin(0)`` for a handful of candidates; a running compare is far faster on CPU than
    the strided reduction (first minimum wins, as with ``argmin``)."""
    best = torch.zeros(d.shape[1:], dtype=torch.long, device=d.device)
    low = d[0]
    for i in range(1, d.shape[0]):
        better = d[i] < low
        best = best.masked_fill(better, i)
        low = torch.minimum(low, d[i])
    return best


ROW_CHUNK_BYTES = 32 << 20  # the temporaries of a whole-matrix step, per slice of rows


def row_slices(n: int, row_bytes: int, budget: int | None = None) -> list[slice]:
    """Balanced slices of ``n`` rows of ``row_bytes`` each, about ``budget`` bytes a slice
    (``ROW_CHUNK_BYTES`` by default; one slice when everything fits). Balanced, so that no slice
    is a lone row: a batched product's rows come out bit for bit the same in any slicing,
    except through BLAS's single-row path."""
    parts = max(1, min(n, -(-n * row_bytes // (budget or ROW_CHUNK_BYTES))))
    return [slice(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def nearest_signs(W: torch.Tensor, mu: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Signs ``(P, N, K)`` (±1) of the level nearest to each weight; ``mu (N,)``, ``alpha (P, N)``.
    Over row slices: the distances to all ``2^P`` levels are ``2^P`` copies of the rows."""
    P = alpha.shape[0]
    patterns = sign_patterns(P, W.dtype, W.device)  # (L, P)
    levels = mu[None] + patterns @ alpha  # (L, N)
    slices = row_slices(W.shape[0], 2 * len(patterns) * W.shape[-1] * W.element_size())
    if len(slices) == 1:  # the GPTQ loop's one column at a time
        return patterns[argmin0((W.unsqueeze(0) - levels.unsqueeze(-1)).abs())].permute(2, 0, 1)
    signs = W.new_empty(P, *W.shape)
    for rows in slices:
        best = argmin0((W[rows].unsqueeze(0) - levels[:, rows].unsqueeze(-1)).abs())  # (n, K)
        signs[:, rows] = patterns[best].permute(2, 0, 1)
    return signs


def compose(mu: torch.Tensor, alpha: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    return mu[:, None] + (alpha[:, :, None] * signs).sum(dim=0)


def residual_fit(W: torch.Tensor, keep: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BiLLM's closed form: each order binarizes the previous residual around its own mean with
    ``α = mean |r − mean(r)|`` over ``keep``; the orders' means add up to one ``μ``.

    Batched over leading dimensions (rows are the last-but-one); returns ``μ (...,)``,
    ``α (P, ...)`` and the final residual ``(..., K)``, zero outside ``keep``.
    """
    keep = keep.to(W.dtype)
    n = keep.sum(dim=-1).clamp_min(1)
    r = W * keep
    mu, alphas = 0.0, []  # keep is 0/1, so r stays zero outside it
    for _ in range(P):
        m = r.sum(dim=-1) / n
        centred = (r - m[..., None]) * keep
        a = centred.abs().sum(dim=-1) / n
        r = r - (m[..., None] + a[..., None] * torch.where(centred >= 0, 1.0, -1.0)) * keep
        mu, alphas = mu + m, alphas + [a]
    return mu, torch.stack(alphas), r


def uniform_init(W: torch.Tensor, keep: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``P``-bit uniform min–max grid over ``keep`` written as ``μ + Σ α_p s_p`` (``α_p = Δ·2^(p−1)``)."""
    big = torch.finfo(W.dtype).max
    lo = torch.where(keep, W, big).amin(dim=1)
    hi = torch.where(keep, W, -big).amax(dim=1)
    lo, hi = torch.where(keep.any(1), lo, 0.0), torch.where(keep.any(1), hi, 0.0)
    step = (hi - lo) / (2**P - 1)
    alpha = torch.stack([step * 2 ** (p - 1) for p in range(P)])
    return (lo + hi) / 2, alpha


def squared_error(W: torch.Tensor, keep: torch.Tensor, mu: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Per-row squared error over ``keep`` of the nearest-level code."""
    Q = compose(mu, alpha, nearest_signs(W, mu, alpha))
    return ((W - Q) ** 2 * keep).sum(dim=1)
