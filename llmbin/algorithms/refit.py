"""Re-solve a packed weight's scales (α and μ) for least Hessian-weighted error, bits fixed.

With the sign bits, classes and salient values fixed, ``ŵ`` is linear in the scales, so the
layer-output error ``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` is a quadratic in them. One exact block
coordinate-descent step per column group (each row's scales for that group, all of H's
coupling to the other groups kept) never raises it; this is ARB-X's calibration-aware
refinement, generalised to every layout the format has (PB-LLM's one group of μ ± α
included).

The error is a sum over rows and every scale belongs to one row, so rows are solved in
chunks, and ``H`` is read in column chunks cast to float64 one at a time: every float64
array is at most ``REFIT_CHUNK_BYTES`` (times the number of scale terms for the bases). A
float64 copy of a 70B down_proj's ``H`` alone would be 6.6 GB.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..packing.bitpack import unpack_bits, unpack_codes
from ..packing.packed_weight import STORAGE_DTYPE, PackedWeight
from ..packing.positions import decode_positions

REFIT_CHUNK_BYTES = 32 << 20  # one float64 (rows × K) or (K × cols) array of a chunk


def _salient_part(pw: PackedWeight):
    """``(sorted flat positions, magnitudes × row scale)`` of the salient values, or ``(None, None)``."""
    if pw.salient is None:
        return None, None
    s = pw.salient
    pos = decode_positions(s.encoding, s.positions, pw.shape)
    return pos, unpack_codes(s.magnitudes, s.count).double() * s.scale.double()[pos // pw.shape[1]]


def _chunk_bases(pw: PackedWeight, bits: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """``(S, r, K)`` float64 for rows whose unpacked planes are ``bits`` (P, r, K): how ŵ changes
    per unit of each α term, then each μ term (zero at salient positions, ``free`` false)."""
    signs = bits.double() * 2 - 1
    cls = pw.classes(bits) if pw.num_classes > 1 else None
    member = lambda c: free if cls is None else free * (cls == c)  # noqa: E731
    out = []
    for t, (p, c) in enumerate(pw.terms):
        b = signs[p] * member(c)
        out.append(b * pw.col_scale[t].double() if pw.col_scale is not None else b)
    if pw.pow2_planes:  # one α shared by every plane: its basis is the planes' weighted sum
        out = [sum(b * 2.0**p for b, (p, _) in zip(out, pw.terms))]
    out += [member(c) for c in pw.means]
    return torch.stack(out)


def _times_h(R: torch.Tensor, H: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """``R @ H[rows, :]`` in float64, reading ``H`` in column chunks."""
    H = H if rows is None else H[rows]
    cols = max(1, REFIT_CHUNK_BYTES // (8 * H.shape[0]))
    return torch.cat([R @ H[:, c0:c0 + cols].double() for c0 in range(0, H.shape[1], cols)], dim=1)


def refit_scales(pw: PackedWeight, W: torch.Tensor, H: torch.Tensor, sweeps: int = 1) -> PackedWeight:
    """A copy of ``pw`` with α and μ re-solved against ``W`` under ``H``, then rounded to fp16 as
    stored; each row keeps its old scales if the rounded new ones would raise its error."""
    N, K = pw.shape
    gs, T = pw.group_size, pw.alpha.shape[0]
    G = -(-K // gs)
    params = torch.cat([pw.alpha.double(), pw.mu.double() if pw.mu is not None else W.new_zeros(0, N, G).double()])
    new_params = params.clone()
    positions, values = _salient_part(pw)
    rows_per_chunk = max(1, REFIT_CHUNK_BYTES // (8 * K))
    expand = lambda p: p.repeat_interleave(gs, dim=-1)[..., :K]  # noqa: E731
    for r0 in range(0, N, rows_per_chunk):
        r1 = min(N, r0 + rows_per_chunk)
        bits = unpack_bits(pw.planes[:, r0:r1], K)
        free = torch.ones(r1 - r0, K, dtype=torch.float64, device=W.device)
        fixed = torch.zeros_like(free)  # the salient values, which no scale here changes
        if positions is not None:
            lo, hi = torch.searchsorted(positions, torch.tensor([r0 * K, r1 * K], device=positions.device)).tolist()
            local = positions[lo:hi] - r0 * K
            free.view(-1)[local] = 0.0
            fixed.view(-1)[local] = (bits[0].reshape(-1)[local].double() * 2 - 1) * values[lo:hi]
        B = _chunk_bases(pw, bits, free)
        residual = lambda p: W[r0:r1].double() - fixed - (expand(p) * B).sum(0)  # noqa: E731
        R = residual(params[:, r0:r1])
        HR = _times_h(R, H)
        before = (R * HR).sum(1)
        P = new_params[:, r0:r1]  # a view: updated in place
        for _ in range(sweeps):
            for g, start in enumerate(range(0, K, gs)):
                cols = slice(start, min(start + gs, K))
                A = B[:, :, cols]  # (S, r, w)
                AH = torch.einsum("snk,kl->snl", A, H[cols, cols].double()) if gs < K else _times_h(
                    A.reshape(-1, K), H).view_as(A)
                M = torch.einsum("snk,tnk->nst", AH, A)
                rhs = torch.einsum("snk,nk->ns", A, HR[:, cols])
                ridge = 1e-9 * M.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
                M = M + ridge[:, None, None] * torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
                delta = torch.linalg.solve(M, rhs.unsqueeze(-1)).squeeze(-1)
                delta = torch.where(torch.isfinite(delta), delta, 0.0)
                P[:, :, g] += delta.t()
                change = torch.einsum("snk,ns->nk", A, delta)
                R[:, cols] -= change
                HR -= _times_h(change, H, cols)
        P.copy_(P.to(STORAGE_DTYPE).double())  # judged as stored
        R = residual(P)
        worse = (R * _times_h(R, H)).sum(1) > before
        P[:, worse] = params[:, r0:r1][:, worse]
    alpha, mu = new_params[:T].to(STORAGE_DTYPE), new_params[T:].to(STORAGE_DTYPE) if pw.mu is not None else None
    return replace(pw, alpha=alpha, mu=mu)
