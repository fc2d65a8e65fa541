"""PB-LLM (Shang et al.): partial binarization with Hessian-guided reconstruction.

A fraction of the weights (the salient ones) is kept at ``salient_bits`` per output channel,
the rest is binarized to ``μ ± α`` per row; all of it goes through the one GPTQ loop.
"""
from __future__ import annotations

import torch

from ..config import PBLLMConfig
from ..registry import register_method
from ..packing.packed_weight import STORAGE_DTYPE, PackedWeight, stored_float
from .binarize import fit_binary
from .gptq import gptq_reconstruct
from .hessian import damped_hessian, prepared_inverse


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


REFIT_CHUNK_BYTES = 32 << 20  # one float64 (rows × K) or (K × cols) array of a refit chunk; ~8 are live


def refit_binary_scales(W, H, binarized, upper, fixed_part):
    """Per-row ``(μ, α)`` minimising the Hessian-weighted error ``eᵀHe`` with the signs fixed.

    ``e = W − fixed_part − (μ·u + α·v)`` where ``u`` marks binarized entries and
    ``v = ±1`` on them. A 2×2 normal system per row; rows where it is singular keep nothing
    and return NaN, which the caller treats as "keep the old values".

    The sums are formed in float64 over chunks of rows and of ``H``'s columns, each chunk array
    at most ``REFIT_CHUNK_BYTES`` (a float64 copy of a 70B down_proj's ``H`` alone would be
    6.6 GB); a matrix that fits one chunk (every SmolLM2 layer does) is summed in a single pass.
    """
    N, K = W.shape
    cols = rows = max(1, REFIT_CHUNK_BYTES // (8 * K))
    sums = torch.zeros(5, N, dtype=torch.float64, device=W.device)  # a11, a12, a22, b1, b2
    for c0 in range(0, K, cols):
        c1 = min(K, c0 + cols)
        Hc = H[:, c0:c1].double()
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            u = binarized[r0:r1].double()
            v = torch.where(upper[r0:r1], 1.0, -1.0).double() * u
            t = W[r0:r1].double() - fixed_part[r0:r1].double()
            Hu, Hv = u @ Hc, v @ Hc
            uc, vc, tc = u[:, c0:c1], v[:, c0:c1], t[:, c0:c1]
            sums[:, r0:r1] += torch.stack(((uc * Hu).sum(1), (uc * Hv).sum(1), (vc * Hv).sum(1),
                                           (Hu * tc).sum(1), (Hv * tc).sum(1)))
    a11, a12, a22, b1, b2 = sums
    det = a11 * a22 - a12 * a12
    ok = det > 1e-12 * (a11 * a22).abs().clamp_min(1e-300)
    det = torch.where(ok, det, torch.ones_like(det))
    mu = torch.where(ok, (a22 * b1 - a12 * b2) / det, torch.nan)
    alpha = torch.where(ok, (a11 * b2 - a12 * b1) / det, torch.nan)
    return mu, alpha


@register_method(PBLLMConfig)
def pbllm_quantize(W: torch.Tensor, H: torch.Tensor, config: PBLLMConfig) -> PackedWeight:
    H = H.float()
    W, U = prepared_inverse(W.float(), H, config.percdamp)
    mask = salient_mask(W, U, config.salient_frac, config.salient_metric)
    qmax = 2 ** (config.salient_bits - 1) - 1
    sigma = symmetric_scale(W, mask, config.salient_bits)
    mu, alpha = fit_binary(W, ~mask)
    mu, alpha = stored_float(mu), stored_float(alpha)  # quantize against what the checkpoint stores

    def quantize_column(w: torch.Tensor, j: int) -> torch.Tensor:
        binary = mu + alpha * torch.where(w >= mu, 1.0, -1.0)
        salient = torch.clamp(torch.round(w / sigma), -qmax, qmax) * sigma
        return torch.where(mask[:, j], salient, binary)

    Q = gptq_reconstruct(W, U, quantize_column, config.blocksize)
    del U
    upper = Q > mu[:, None]  # the binary choice each weight took
    ints = torch.round(Q / sigma[:, None]).to(torch.int16)  # |q| <= 127: int16, not int64, at 70B sizes
    if config.refit_scales and config.salient_frac < 1:
        new_mu, new_alpha = refit_binary_scales(W, damped_hessian(H, config.percdamp), ~mask, upper,
                                                torch.where(mask, Q, 0.0))
        keep = torch.isnan(new_mu) | torch.isnan(new_alpha)
        mu = stored_float(torch.where(keep, mu, new_mu.float()))
        alpha = stored_float(torch.where(keep, alpha, new_alpha.float()))
    bits = torch.where(mask, ints > 0, upper).unsqueeze(0)
    return PackedWeight.from_codes(bits, alpha[None, :, None], mu[None, :, None], W.shape[1], salient_mask=mask,
                                   salient_mag=ints.abs(), salient_scale=sigma, salient_bits=config.salient_bits)
