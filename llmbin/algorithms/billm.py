"""BiLLM (Huang et al.) and ARB-LLM (Li et al.): structured binarization per block of columns.

Per block of ``blocksize`` columns, as the GPTQ loop reaches it:

1. rank columns by saliency (Hessian metric ``Σ_rows w² / [H⁻¹]ⱼⱼ²``, or ``Σ|w|``) and search
   the salient column count for least binarization error (BiLLM's structural search);
2. salient columns get a two-plane residual code ``μ + α₁s₁ + α₂s₂``;
3. the other weights are split at a searched magnitude break-point into a concentrated and a
   sparse class, each binarized with its own ``μ, α``;
4. ARB refines every class's scales and signs alternately (``refine_iters``); ARB-RC replaces
   ``μ + α`` with row times column scales ``α_r·β_c``.

The GPTQ loop then quantizes each column to the nearest level its class allows (the class
bit is free per weight, so the split is re-decided with the error feedback applied). ARB-X
(``recipes/arb-x.yaml``) is BiLLM with 15 refinement rounds and the scale refit stage
(``refit_scales``), which re-solves all scales for least Hessian-weighted error after this
function, as for any method (``algorithms.layer``). Stored as two planes:
plane 0 is the sign, plane 1 is the class bit in ordinary columns and the residual sign in
salient columns; a per-column mask marks salient columns. Every bit of that is counted.
"""
from __future__ import annotations

import torch

from ..config import ARBRCConfig, BiLLMConfig
from ..packing.packed_weight import PackedWeight, stored_float
from .gptq import gptq_reconstruct
from .hessian import prepared_inverse
from .levels import argmin0, residual_fit, sign_patterns
from .scales import rc_fit, refine_fit

CONC, SPARSE, SALIENT = 0, 1, 2
TERMS = ((0, CONC), (0, SPARSE), (0, SALIENT), (1, SALIENT))  # α slots: one per class, plus the residual


def salient_column_count(W: torch.Tensor, order: torch.Tensor, max_columns: int) -> int:
    """BiLLM's structural search: the count of top-ranked columns whose two-plane residual code
    (with the rest also coded with two planes, the reference's fast proxy) has least error."""
    b = W.shape[1]
    counts = torch.arange(1, min(max_columns, b - 1) + 1, device=W.device)
    if counts.numel() == 0:
        return 0
    rank = torch.empty(b, dtype=torch.long, device=W.device)
    rank[order] = torch.arange(b, device=W.device)
    salient = rank[None, None, :] < counts[:, None, None]  # (C, 1, b)
    _, _, r_s = residual_fit(W, salient, 2)
    _, _, r_n = residual_fit(W, ~salient, 2)
    err = (r_s**2).sum(dim=(1, 2)) + (r_n**2).sum(dim=(1, 2))
    return int(counts[err.argmin()])


def split_point(W: torch.Tensor, ordinary: torch.Tensor, points: int) -> torch.Tensor:
    """BiLLM's break-point search: the magnitude threshold (a quantile of |w| between 10 % and
    90 %) whose two one-plane classes ``|w| ≤ t`` and ``|w| > t`` have least total error."""
    absw = W.abs()
    values = absw[ordinary.expand_as(W)]
    if values.numel() == 0:
        return W.new_zeros(())
    q = torch.linspace(0.1, 0.9, points, device=W.device) if points > 1 else W.new_tensor([0.5])
    thresholds = torch.quantile(values.float()[: 2**24], q.to(torch.float32)).to(W.dtype)
    low = ordinary & (absw[None] <= thresholds[:, None, None])
    high = ordinary & (absw[None] > thresholds[:, None, None])
    err = sum(_one_plane_error(W, m) for m in (low, high))
    return thresholds[err.argmin()]


def _one_plane_error(W: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Total squared error of ``residual_fit(W, keep, 1)`` per leading index, without forming it:
    with ``c = w − μ`` and ``α = mean|c|``, ``Σ(|c| − α)² = Σc² − n·α²``."""
    k = keep.to(W.dtype)
    n = k.sum(-1)
    c = (W - (W * k).sum(-1, keepdim=True) / n.clamp_min(1)[..., None]) * k
    a = c.abs().sum(-1) / n.clamp_min(1)
    return ((c * c).sum(-1) - n * a * a).sum(-1)


def mean_and_row_scale(W: torch.Tensor, keep: torch.Tensor, planes: int, refine_iters: int):
    """BiLLM's class code ``μ_r + Σ α_r s``: closed form, then ARB's alternating refinement."""
    m, a, _ = residual_fit(W, keep, planes)
    if refine_iters:
        m, a = refine_fit(W, keep, m, a, refine_iters)
    return m, a, None


def row_and_column_scales(W: torch.Tensor, keep: torch.Tensor, planes: int, refine_iters: int):
    """ARB-RC class code ``Σ α_r β_c s``, no mean."""
    a, bt = rc_fit(W, keep, planes, refine_iters)
    return None, a, bt


def fit_block(W: torch.Tensor, saliency: torch.Tensor, config: BiLLMConfig, fit_class) -> dict:
    """The block's structure and scales: salient columns, per-class ``μ (3, N)``, ``α (4, N)``
    and column scales ``β (4, b)`` (ones unless ``fit_class`` gives them; ``fit_class`` is one of
    the two class codes above); all rounded to what the checkpoint stores."""
    order = torch.argsort(saliency, descending=True)
    count = salient_column_count(W, order, config.max_salient_columns)
    salient = torch.zeros(W.shape[1], dtype=torch.bool, device=W.device)
    salient[order[:count]] = True
    ordinary = ~salient[None, :]
    threshold = split_point(W, ordinary, config.split_points)
    masks = {CONC: ordinary & (W.abs() <= threshold), SPARSE: ordinary & (W.abs() > threshold),
             SALIENT: salient[None, :].expand_as(W)}
    N, b = W.shape
    mu, alpha, beta = W.new_zeros(3, N), W.new_zeros(4, N), W.new_ones(4, b)
    for c, keep in masks.items():
        planes = 2 if c == SALIENT else 1
        slots = [t for t, (_, cls) in enumerate(TERMS) if cls == c]
        m, a, bt = fit_class(W, keep, planes, config.refine_iters)
        if m is not None:
            mu[c] = m
        if bt is not None:
            beta[slots] = bt
        alpha[slots] = a
    return {"salient": salient, "mu": stored_float(mu), "alpha": stored_float(alpha), "beta": stored_float(beta)}


def billm_quantize(W: torch.Tensor, H: torch.Tensor, config: BiLLMConfig) -> PackedWeight:
    """BiLLM (and ARB-X, its recipe): each class coded as a mean plus row scales."""
    return structured_binarize(W, H, config, mean_and_row_scale, column_scales=False)


def arb_rc_quantize(W: torch.Tensor, H: torch.Tensor, config: ARBRCConfig) -> PackedWeight:
    """ARB-RC: each class coded with row times column scales, no mean."""
    return structured_binarize(W, H, config, row_and_column_scales, column_scales=True)


def structured_binarize(W: torch.Tensor, H: torch.Tensor, config: BiLLMConfig, fit_class, *,
                        column_scales: bool) -> PackedWeight:
    """The shared GPTQ loop of BiLLM and ARB: ``fit_class`` codes each class of a block; with
    ``column_scales`` (ARB-RC's code) the layout stores column scales and no means."""
    H = H.float()
    W, U = prepared_inverse(W.float(), H, config.percdamp)
    N, K = W.shape
    bs = config.blocksize
    G = -(-K // bs)
    udiag = torch.diag(U)
    salient = torch.zeros(K, dtype=torch.bool, device=W.device)
    mu, alpha, beta = W.new_zeros(3, N, G), W.new_zeros(4, N, G), W.new_ones(4, K)
    bits = torch.zeros(2, N, K, dtype=torch.bool, device=W.device)
    current = {}

    def begin_block(W1: torch.Tensor, start: int) -> None:
        cols = slice(start, start + W1.shape[1])
        score = (W1**2 / udiag[cols][None] ** 2).sum(0) if config.salient_metric == "hessian" else W1.abs().sum(0)
        fit = fit_block(W1, score, config, fit_class)
        g = start // bs
        salient[cols], mu[:, :, g], alpha[:, :, g], beta[:, cols] = fit["salient"], fit["mu"], fit["alpha"], fit["beta"]
        current.update(fit, start=start)

    patterns = sign_patterns(2, W.dtype, W.device)  # (4, 2): rows are (s_plane0, s_plane1)

    def quantize_column(w: torch.Tensor, j: int) -> torch.Tensor:
        jj = j - current["start"]
        m, a, bt = current["mu"], current["alpha"], current["beta"][:, jj]
        if current["salient"][jj]:
            levels = m[SALIENT][None] + patterns[:, :1] * (a[2] * bt[2])[None] + patterns[:, 1:] * (a[3] * bt[3])[None]
            best = argmin0((w[None] - levels).abs())
            bits[0, :, j], bits[1, :, j] = patterns[best, 0] > 0, patterns[best, 1] > 0
        else:  # levels (class c, sign s): μ_c + s·α_c·β_c
            levels = m[[CONC, CONC, SPARSE, SPARSE]] + patterns[:, :1] * (a[[0, 0, 1, 1]] * bt[[0, 0, 1, 1], None])
            best = argmin0((w[None] - levels).abs())
            bits[0, :, j], bits[1, :, j] = patterns[best, 0] > 0, best >= 2
        return levels.gather(0, best[None])[0]

    gptq_reconstruct(W, U, quantize_column, bs, begin_block)
    return PackedWeight.from_codes(bits, alpha, None if column_scales else mu, bs, terms=TERMS,
                                   means=() if column_scales else (CONC, SPARSE, SALIENT), class_plane=1,
                                   column_mask=salient, col_scale=beta if column_scales else None)
