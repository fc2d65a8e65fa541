"""Scale fitting: every mechanism that fits a binary code's scales (μ, α, β) to given signs or
classes, in one module.

They stay separate, named functions: each has its own arithmetic, which the checkpoints it
made depend on bit for bit, and a unification that cannot keep that arithmetic exact waits
for its own issue.

* :func:`refine_fit`: ARB's alternating refinement of a per-row code ``μ + Σ α_p s_p`` over a
  mask (nearest-level signs, then least-squares ``(μ, α)`` by :func:`solve_scales`); PB-LLM's
  binarized part, DB-LLM's dual planes and BiLLM / ARB-X's classes.
* :func:`rc_fit`: ARB-RC's alternating least squares of row times column scales ``α_r·β_c``.
* :func:`row_scale_search`: PB-LLM's search of a shrink ``γ·α`` per row through whole GPTQ
  passes (each row keeps the pass that left it least error).
* :func:`refit_scales`: a packed weight's scales re-solved for least Hessian-weighted error,
  bits fixed; the scale refit stage (``QuantConfig.refit_scales``) that the layer pipeline
  (``algorithms.layer``) applies after any method's fit.

The closed-form initialisations (``levels.residual_fit``, BiLLM's, and ``levels.uniform_init``)
stay with the codes in ``algorithms.levels``.

``refit_scales`` re-solves every layout the format has (PB-LLM's one group of μ ± α included).
With the sign bits, classes and salient values fixed, ``ŵ`` is linear in the scales, so the
layer-output error ``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` is a quadratic in them. One exact block
coordinate-descent step per column group (each row's scales for that group, all of H's
coupling to the other groups kept) never raises it; this is ARB-X's calibration-aware
refinement, generalised. The error is a sum over rows and every scale belongs to one row, so
rows are solved in chunks, and ``H`` is read in column chunks cast to float64 one at a time:
every float64 array is at most ``REFIT_CHUNK_BYTES`` (times the number of scale terms for the
bases and their products with ``H``), and the row-batched products copy their operands a slice of
rows at a time. A float64 copy of a 70B down_proj's ``H`` alone would be 6.6 GB.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ..packing.bitpack import unpack_bits, unpack_codes
from ..packing.packed_weight import STORAGE_DTYPE, PackedWeight, stored_float
from ..packing.positions import decode_positions
from .levels import argmin0, nearest_signs, row_slices, sign_patterns


def solve_scales(W: torch.Tensor, keep: torch.Tensor, signs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``(μ, α)`` per row for fixed signs over ``keep``; rows whose system is singular
    (too few or degenerate members) come back NaN."""
    A, b = [], []
    for rows in row_slices(W.shape[0], 3 * (signs.shape[0] + 1) * W.shape[1] * W.element_size()):
        k = keep[rows].to(W.dtype)
        basis = torch.cat([k.unsqueeze(0), signs[:, rows] * k], dim=0)  # (P+1, n, K)
        A.append(torch.einsum("pnk,qnk->npq", basis, basis))
        b.append(torch.einsum("pnk,nk->np", basis, W[rows]))
    A, b = torch.cat(A).double(), torch.cat(b).double()
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    scale = A.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-30)[:, None, None]
    L, info = torch.linalg.cholesky_ex(A + 1e-10 * scale * eye)
    x = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    cond_ok = (info == 0) & (torch.linalg.det(A / scale).abs() > 1e-9)
    x = torch.where(cond_ok[:, None], x, torch.nan).to(W.dtype)
    return x[:, 0], x[:, 1:].t()


def refine_fit(W: torch.Tensor, keep: torch.Tensor, mu: torch.Tensor, alpha: torch.Tensor,
               iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternate nearest-level signs and least-squares scales for up to ``iters`` rounds
    (stops when no sign changes). Each round lowers the squared error over ``keep``; rows whose
    least-squares system is singular keep their previous scales."""
    previous = None
    for _ in range(iters):
        signs = nearest_signs(W, mu, alpha)
        if previous is not None and torch.equal(signs, previous):
            break
        previous = signs
        new_mu, new_alpha = solve_scales(W, keep, signs)
        ok = torch.isfinite(new_mu) & torch.isfinite(new_alpha).all(dim=0)
        mu = torch.where(ok, new_mu, mu)
        alpha = torch.where(ok[None], new_alpha, alpha)
    return mu, alpha


def rc_fit(W: torch.Tensor, keep: torch.Tensor, P: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ARB-RC: ``Σ_p α_p[row]·β_p[col]·s_p`` over ``keep`` (no mean). Residual initialisation,
    then alternating least squares of each plane's row scales, column scales, and the signs."""
    k = keep.to(W.dtype).expand_as(W)
    r, alphas, betas, signs = W * k, [], [], []
    for _ in range(P):
        s = torch.where(r >= 0, 1.0, -1.0)
        a = (r.abs() * k).sum(1) / k.sum(1).clamp_min(1)
        b = (r.abs() / a.clamp_min(1e-12)[:, None] * k).sum(0) / k.sum(0).clamp_min(1)
        r = r - a[:, None] * b[None] * s * k
        alphas, betas, signs = alphas + [a], betas + [b], signs + [s]
    patterns = sign_patterns(P, W.dtype, W.device)
    for _ in range(iters):
        for p in range(P):
            target = (W - sum(alphas[q][:, None] * betas[q][None] * signs[q] for q in range(P) if q != p)) * k
            c = betas[p][None] * signs[p] * k
            den = (c * c).sum(1)
            alphas[p] = torch.where(den > 0, (c * target).sum(1) / den.clamp_min(1e-30), alphas[p])
            c = alphas[p][:, None] * signs[p] * k
            den = (c * c).sum(0)
            betas[p] = torch.where(den > 0, (c * target).sum(0) / den.clamp_min(1e-30), betas[p])
        mags = torch.stack([a[:, None] * b[None] for a, b in zip(alphas, betas)])  # (P, N, b)
        levels = torch.einsum("lp,pnk->lnk", patterns, mags)
        best = argmin0((W[None] - levels).abs())
        signs = list(patterns[best].permute(2, 0, 1))
    return torch.stack(alphas), torch.stack(betas)


def scale_shrinks(candidates: int) -> list[float]:
    """The factors γ tried on the least-squares α: ``candidates`` evenly spaced in [0.5, 1] (1 alone if off).
    Plain floats, not a tensor: nothing here may land on the default device."""
    if candidates <= 1:
        return [1.0]
    return [0.5 + 0.5 * i / (candidates - 1) for i in range(candidates)]


GptqPass = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``α (N,) -> (Q (N, K), row error (N,))``: one GPTQ pass with the row scales ``α``."""


def row_scale_search(alpha: torch.Tensor, candidates: int, gptq_pass: GptqPass
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PB-LLM's scale search: one ``gptq_pass`` per shrink ``γ`` of :func:`scale_shrinks`, with
    ``α·γ`` rounded as stored; each row keeps the pass whose error was least (the first on a
    tie). Returns ``(Q, row error, α chosen per row)``.

    The least-squares α fits W, but GPTQ feeds each column's error into the next ones, and a
    smaller α often leaves less to carry (up to a third less layer error on SmolLM2's o_proj
    and last down_proj). Rows are independent in GPTQ, so the choice is per row."""
    Q = error = None
    for shrink in scale_shrinks(candidates):
        scaled = stored_float(alpha * shrink)
        Q_try, error_try = gptq_pass(scaled)
        if Q is None:
            Q, error, chosen = Q_try, error_try, scaled
            continue
        better = error_try < error
        Q[better], error[better], chosen[better] = Q_try[better], error_try[better], scaled[better]
        del Q_try
    return Q, error, chosen


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
    """``R @ H[rows, :]`` in float64, reading ``H`` in column chunks into one output."""
    H = H if rows is None else H[rows]
    cols = max(1, REFIT_CHUNK_BYTES // (8 * H.shape[0]))
    out = torch.empty(R.shape[0], H.shape[1], dtype=torch.float64, device=R.device)
    for c0 in range(0, H.shape[1], cols):
        out[:, c0:c0 + cols] = R @ H[:, c0:c0 + cols].double()
    return out


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

    def residual(r0, r1, fixed, B, p):  # W − fixed − Σ_s expand(p_s)·B_s, one term at a time
        R, fit = W[r0:r1].double() - fixed, expand(p[0]) * B[0]
        for s in range(1, len(B)):
            fit += expand(p[s]) * B[s]
        R -= fit
        return R

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
        R = residual(r0, r1, fixed, B, params[:, r0:r1])
        HR = _times_h(R, H)
        before = (R * HR).sum(1)
        P = new_params[:, r0:r1]  # a view: updated in place
        for _ in range(sweeps):
            for g, start in enumerate(range(0, K, gs)):
                cols = slice(start, min(start + gs, K))
                A = B[:, :, cols]  # (S, r, w)
                AH = torch.einsum("snk,kl->snl", A, H[cols, cols].double()) if gs < K else _times_h(
                    A.reshape(-1, K), H).view_as(A)
                # the row-batched products, a slice of rows at a time (each copies its operands)
                sub = row_slices(r1 - r0, 8 * A.shape[0] * A.shape[2], REFIT_CHUNK_BYTES)
                M = torch.cat([torch.einsum("snk,tnk->nst", AH[:, n], A[:, n]) for n in sub])
                del AH
                rhs = torch.cat([torch.einsum("snk,nk->ns", A[:, n], HR[n, cols]) for n in sub])
                ridge = 1e-9 * M.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
                M = M + ridge[:, None, None] * torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
                delta = torch.linalg.solve(M, rhs.unsqueeze(-1)).squeeze(-1)
                delta = torch.where(torch.isfinite(delta), delta, 0.0)
                P[:, :, g] += delta.t()
                change = torch.empty(r1 - r0, A.shape[2], dtype=torch.float64, device=W.device)
                for n in sub:
                    change[n] = torch.einsum("snk,ns->nk", A[:, n], delta[n])
                R[:, cols] -= change
                HR -= _times_h(change, H, cols)
        P.copy_(P.to(STORAGE_DTYPE).double())  # judged as stored
        del HR
        R = residual(r0, r1, fixed, B, P)
        worse = (R * _times_h(R, H)).sum(1) > before
        P[:, worse] = params[:, r0:r1][:, worse]
        del R, B, free, fixed  # before the next chunk allocates its own
    alpha, mu = new_params[:T].to(STORAGE_DTYPE), new_params[T:].to(STORAGE_DTYPE) if pw.mu is not None else None
    return replace(pw, alpha=alpha, mu=mu)
