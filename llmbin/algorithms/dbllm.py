"""DB-LLM (Chen et al.) flexible dual binarization (FDB), the layer-wise part.

FDB writes a 2-bit weight as two binary planes, ``ŵ = α₁b₁ + α₂b₂ + c`` with ``b ∈ {0, 1}``,
initialised from the 2-bit uniform quantizer and with the two scales then free. Here that is
stored in the format's ±1 form, ``ŵ = μ + α₁'s₁ + α₂'s₂`` (``α' = α/2``, ``μ = c + (α₁+α₂)/2``),
and the scales and planes are refined by alternating least squares before the GPTQ loop
assigns each weight its nearest of the four levels with error feedback. ``planes`` other than 2
give the same code with ``2^P`` levels: one plane is a sign code ``μ + α·s``, which with group
scales (``group_size``) lies between 1 and 2 true bits. The scale refit
(``refit_scales``, on by default for DB-LLM) and the distillation (``distill``) are stages that
the pipeline applies around this function, as for any method: ``algorithms.layer`` and
``llmbin.distill``.
"""
from __future__ import annotations

import torch

from ..config import DBLLMConfig
from ..packing.packed_weight import PackedWeight, stored_float
from .grouped import reconstruct_levels
from .hessian import prepared_inverse
from .levels import nearest_signs, uniform_init
from .scales import refine_fit


def fit_planes(W: torch.Tensor, planes: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.ones_like(W, dtype=torch.bool)
    mu, alpha = refine_fit(W, keep, *uniform_init(W, keep, planes), iters)
    return stored_float(mu), stored_float(alpha)


def dbllm_quantize(W: torch.Tensor, H: torch.Tensor, config: DBLLMConfig) -> PackedWeight:
    H = H.float()
    W, U = prepared_inverse(W.float(), H, config.percdamp)
    nearest = lambda w, mu, alpha: nearest_signs(w[:, None], mu, alpha)[:, :, 0]  # noqa: E731
    return reconstruct_levels(W, U, config.planes, config.group_size, config.blocksize,
                              lambda Wg: fit_planes(Wg, config.planes, config.refine_iters), nearest)
