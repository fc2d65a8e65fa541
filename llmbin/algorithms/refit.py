"""Re-solve a packed weight's scales (α and μ) for least Hessian-weighted error, bits fixed.

With the sign bits, classes and salient values fixed, ``ŵ`` is linear in the scales, so the
layer-output error ``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` is a quadratic in them. One exact block
coordinate-descent step per column group (each row's scales for that group, all of H's
coupling to the other groups kept) never raises it; this is ARB-X's calibration-aware
refinement, generalised to every layout the format has.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..packing.bitpack import unpack_bits
from ..packing.packed_weight import STORAGE_DTYPE, PackedWeight
from ..packing.positions import decode_positions
from .metrics import hessian_weighted_error


def _bases(pw: PackedWeight) -> torch.Tensor:
    """``(S, N, K)`` float64: how ŵ changes per unit of each α term, then each μ term."""
    N, K = pw.shape
    bits = unpack_bits(pw.planes, K)
    signs = bits.double() * 2 - 1
    cls = pw.classes(bits)
    free = torch.ones(N, K, dtype=torch.float64, device=pw.planes.device)
    if pw.salient is not None:
        s = pw.salient
        free.view(-1)[decode_positions(s.encoding, s.positions, pw.shape)] = 0.0
    out = []
    for t, (p, c) in enumerate(pw.terms):
        b = signs[p] * (cls == c) * free
        out.append(b * pw.col_scale[t].double() if pw.col_scale is not None else b)
    if pw.pow2_planes:  # one α shared by every plane: its basis is the planes' weighted sum
        out = [sum(b * 2.0**p for b, (p, _) in zip(out, pw.terms))]
    out += [(cls == c) * free for c in pw.means]
    return torch.stack(out)


def refit_scales(pw: PackedWeight, W: torch.Tensor, H: torch.Tensor, sweeps: int = 1) -> PackedWeight:
    """A copy of ``pw`` with α and μ re-solved against ``W`` under ``H`` (fp16-rounded as stored).
    Returns ``pw`` itself if rounding would make the result worse."""
    W, H = W.double(), H.double()
    N, K = pw.shape
    gs, T = pw.group_size, pw.alpha.shape[0]
    bases = _bases(pw)
    G = -(-K // gs)
    params = torch.cat([pw.alpha.double(), pw.mu.double() if pw.mu is not None else W.new_zeros(0, N, G)])
    original = pw.decode(torch.float64)
    R = W - original
    HR = R @ H
    for _ in range(sweeps):
        for g, start in enumerate(range(0, K, gs)):
            cols = slice(start, min(start + gs, K))
            A = bases[:, :, cols].permute(1, 2, 0)  # (N, k, S)
            AtH = torch.einsum("nks,kl->nsl", A, H[cols, cols])
            M = AtH @ A
            rhs = torch.einsum("nks,nk->ns", A, HR[:, cols])
            ridge = 1e-9 * M.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
            M = M + ridge[:, None, None] * torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
            delta = torch.linalg.solve(M, rhs.unsqueeze(-1)).squeeze(-1)
            delta = torch.where(torch.isfinite(delta), delta, 0.0)
            params[:, :, g] += delta.t()
            change = torch.einsum("nks,ns->nk", A, delta)
            R[:, cols] -= change
            HR -= change @ H[cols, :]
    new = replace(pw, alpha=params[:T].to(STORAGE_DTYPE), mu=params[T:].to(STORAGE_DTYPE) if pw.mu is not None else None)
    if hessian_weighted_error(W, new.decode(torch.float64), H) > hessian_weighted_error(W, original, H):
        return pw
    return new
