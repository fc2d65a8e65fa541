"""PB-LLM (Shang et al.): partial binarization with Hessian-guided reconstruction.

A fraction of the weights (the salient ones) is kept at ``salient_bits`` per output channel,
the rest is binarized to ``μ ± α`` per row; all of it goes through the one GPTQ loop. The
binarized scales are fitted by ``scales.refine_fit``, then searched per row through the GPTQ
passes (``scales.row_scale_search``); the scale refit after this function (``refit_scales``,
on by default for PB-LLM) is the pipeline's stage, as for any method (``algorithms.layer``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PBLLMConfig
from ..packing.packed_weight import STORAGE_DTYPE, PackedWeight, stored_float
from .gptq import gptq_reconstruct_scored
from .hessian import act_order, permute_hessian, prepared_inverse
from .scales import refine_fit, row_scale_search


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


@dataclass
class _Reconstruction:
    """One column order's result, in the caller's column order: the quantized ``Q``, the salient
    ``mask`` and its per-row ``sigma``, the binarized ``mu ± alpha``, and the total error left."""
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

    # each row keeps the γ·α whose GPTQ pass left it the least Hessian-weighted error (U bound as an
    # argument, so that deleting it below frees it once the search is done)
    Q, error, chosen = row_scale_search(
        alpha, config.scale_search if keep.any() else 0,
        lambda scaled, U=U: gptq_reconstruct_scored(W, U, quantizer(scaled), config.blocksize))
    del U
    if perm is not None:
        inverse = torch.argsort(perm)
        Q, mask = Q[:, inverse], mask[:, inverse]
    return _Reconstruction(Q, mask, sigma, mu, chosen, error.sum().item())


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
    return PackedWeight.from_codes(bits, best.alpha[None, :, None], best.mu[None, :, None], W.shape[1],
                                   salient_mask=best.mask, salient_mag=ints.abs(), salient_scale=best.sigma,
                                   salient_bits=config.salient_bits)
