"""PB-LLM (Shang et al.): partial binarization with Hessian-guided reconstruction.

A fraction of the weights (the salient ones) is kept at ``salient_bits`` per output channel,
the rest is binarized to ``μ ± α`` per row; all of it goes through the one GPTQ loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PBLLMConfig
from ..registry import register_method
from ..packing.packed_weight import STORAGE_DTYPE, PackedWeight, stored_float
from .gptq import gptq_reconstruct_scored
from .hessian import act_order, damped_hessian, permute_hessian, prepared_inverse
from .levels import refine_fit
from .refit import refit_scales


def salient_mask(W: torch.Tensor, Hinv_upper: torch.Tensor, frac: float, metric: str) -> torch.Tensor:
    """Element-wise top-``frac`` of the saliency metric over the whole matrix.

    The Hessian metric ``w² / [H⁻¹]ⱼⱼ²`` is the OBS cost of removing a weight (SparseGPT's
    choice, with the Cholesky factor's diagonal); magnitude is ``|w|``.
    """
    k = round(frac * W.numel())
    mask = torch.zeros_like(W, dtype=torch.bool)
    if k == 0:
        return mask
    score = W.abs() if metric == "magnitude" else W.pow(2) / torch.diag(Hinv_upper).pow(2).unsqueeze(0)
    mask.view(-1)[torch.topk(score.flatten(), k).indices] = True
    return mask


def symmetric_scale(W: torch.Tensor, mask: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row scale of a symmetric ``bits``-bit grid covering the masked weights, fp16-exact."""
    qmax = 2 ** (bits - 1) - 1
    scale = (W.abs() * mask).amax(dim=1) / qmax
    scale = scale.to(STORAGE_DTYPE).to(W.dtype)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def scale_shrinks(candidates: int) -> list[float]:
    """The factors γ tried on the least-squares α: ``candidates`` evenly spaced in [0.5, 1] (1 alone if off).
    Plain floats, not a tensor: nothing here may land on the default device."""
    if candidates <= 1:
        return [1.0]
    return [0.5 + 0.5 * i / (candidates - 1) for i in range(candidates)]


@dataclass
class _Reconstruction:
    """One column order's result, in the caller's column order: the quantized ``Q``, the salient
    ``mask`` and its per-row ``sigma``, the binarized ``mu ± alpha``, and the total error left."""
    W: torch.Tensor
    Q: torch.Tensor
    mask: torch.Tensor
    sigma: torch.Tensor
    mu: torch.Tensor
    alpha: torch.Tensor
    error: float


def _reconstruct(W: torch.Tensor, H: torch.Tensor, config: PBLLMConfig, perm: torch.Tensor | None) -> _Reconstruction:
    """Mask, fit and GPTQ with the columns taken in ``perm``'s order (left to right if None)."""
    if perm is None:
        W, U = prepared_inverse(W, H, config.percdamp)
    else:
        W, U = prepared_inverse(W[:, perm], permute_hessian(H, perm), config.percdamp)
    mask = salient_mask(W, U, config.salient_frac, config.salient_metric)
    qmax = 2 ** (config.salient_bits - 1) - 1
    sigma = symmetric_scale(W, mask, config.salient_bits)
    keep = ~mask
    n = keep.sum(dim=1).clamp_min(1)
    mu = (W * keep).sum(dim=1) / n
    alpha = ((W - mu[:, None]).abs() * keep).sum(dim=1) / n
    mu, alpha = refine_fit(W, keep, mu, alpha[None], iters=20)  # least squares over the binarized weights only
    mu, alpha = stored_float(mu), stored_float(alpha[0].clamp_min(0))  # quantize against what the checkpoint stores

    def quantizer(alpha: torch.Tensor):
        def quantize_column(w: torch.Tensor, j: int) -> torch.Tensor:
            binary = mu + alpha * torch.where(w >= mu, 1.0, -1.0)
            salient = torch.clamp(torch.round(w / sigma), -qmax, qmax) * sigma
            return torch.where(mask[:, j], salient, binary)
        return quantize_column

    # The least-squares α fits W, but GPTQ feeds each column's error into the next ones, and a
    # smaller α often leaves less to carry (up to a third less layer error on SmolLM2's o_proj and
    # last down_proj). Rows are independent in GPTQ, so each row keeps the γ·α whose pass left
    # it the least Hessian-weighted error: one GPTQ pass per candidate.
    Q = error = None
    for shrink in scale_shrinks(config.scale_search if keep.any() else 0):
        scaled = stored_float(alpha * shrink)
        Q_try, error_try = gptq_reconstruct_scored(W, U, quantizer(scaled), config.blocksize)
        if Q is None:
            Q, error, chosen = Q_try, error_try, scaled
            continue
        better = error_try < error
        Q[better], error[better], chosen[better] = Q_try[better], error_try[better], scaled[better]
        del Q_try
    del U
    if perm is not None:
        inverse = torch.argsort(perm)
        W, Q, mask = W[:, inverse], Q[:, inverse], mask[:, inverse]
    return _Reconstruction(W, Q, mask, sigma, mu, chosen, error.sum().item())


@register_method(PBLLMConfig)
def pbllm_quantize(W: torch.Tensor, H: torch.Tensor, config: PBLLMConfig) -> PackedWeight:
    H, W = H.float(), W.float()
    best = _reconstruct(W, H, config, None)
    if config.order_search:
        # GPTQ's activation order (desc_act) changes the mask (its OBS cost depends on the order)
        # and every column's feedback; which order wins varies layer by layer. Per-row scales make
        # the order invisible to the format. The choice is per layer, not per row: rows choosing
        # their order would also choose their salient count, and drift above the asked fraction.
        other = _reconstruct(W, H, config, act_order(H))
        if other.error < best.error:
            best = other
        del other
    ints = torch.round(best.Q / best.sigma[:, None]).to(torch.int16)  # |q| <= 127: int16, not int64, at 70B sizes
    bits = torch.where(best.mask, ints > 0, best.Q > best.mu[:, None]).unsqueeze(0)  # salient: the value's sign; else the level taken
    packed = PackedWeight.from_codes(bits, best.alpha[None, :, None], best.mu[None, :, None], W.shape[1], salient_mask=best.mask,
                                     salient_mag=ints.abs(), salient_scale=best.sigma, salient_bits=config.salient_bits)
    if config.refit_scales and config.salient_frac < 1:
        packed = refit_scales(packed, best.W, damped_hessian(H, config.percdamp))
    return packed
