import pytest
import torch

from llmbin.algorithms.metrics import hessian_weighted_error
from llmbin.algorithms.scales import refit_scales
from llmbin.packing.packed_weight import PackedWeight


def _layout(W, group, pow2=False):
    g = torch.Generator().manual_seed(3)
    N, K = W.shape
    G = -(-K // group)
    bits = torch.rand(2, N, K, generator=g) > 0.5
    alpha = torch.rand(1 if pow2 else 2, N, G, generator=g) * 0.05
    mu = torch.randn(1, N, G, generator=g) * 0.01
    return PackedWeight.from_codes(bits, alpha, mu, group, pow2_planes=pow2)


def test_refit_never_raises_the_hessian_error_and_keeps_the_bits(layer_problem):
    W, H = layer_problem
    for group, pow2 in ((96, False), (32, False), (32, True)):
        pw = _layout(W, group, pow2)
        new = refit_scales(pw, W, H)
        assert torch.equal(new.planes, pw.planes) and new.alpha.shape == pw.alpha.shape
        before, after = (hessian_weighted_error(W, p.decode(), H) for p in (pw, new))
        assert after < 0.9 * before


def test_one_group_one_plane_refit_is_the_closed_form_2x2_solution(layer_problem):
    """PB-LLM's case: per row, μ·u + α·v with u = 1, v = ±1 solves a 2 × 2 system (eᵀHe minimal)."""
    W, H = layer_problem
    upper = W > 0
    pw = PackedWeight.from_codes(upper[None], torch.ones(1, W.shape[0], 1), torch.zeros(1, W.shape[0], 1), W.shape[1])
    new = refit_scales(pw, W, H)
    Hd, u = H.double(), torch.ones_like(W, dtype=torch.float64)
    v = torch.where(upper, 1.0, -1.0).double()
    Hu, Hv, w = u @ Hd, v @ Hd, W.double()
    A = torch.stack([torch.stack([(u * Hu).sum(1), (u * Hv).sum(1)], -1), torch.stack([(v * Hu).sum(1), (v * Hv).sum(1)], -1)], -2)
    mu, alpha = torch.linalg.solve(A, torch.stack([(Hu * w).sum(1), (Hv * w).sum(1)], -1)).unbind(-1)
    assert torch.allclose(new.mu[0, :, 0].double(), mu, rtol=2e-3, atol=1e-6)
    assert torch.allclose(new.alpha[0, :, 0].double(), alpha, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("group", [130, 32])
def test_refit_in_row_and_column_chunks_equals_one_pass(monkeypatch, group):
    """Big layers refit over chunks of rows and of H's columns (bounded memory), salient values
    included; the result agrees with the one-pass solve to float64 rounding."""
    import llmbin.algorithms.scales as scales

    g = torch.Generator().manual_seed(3)
    N, K = 50, 130
    X = torch.randn(1000, K, generator=g)
    H, W = X.T @ X / 1000, torch.randn(N, K, generator=g)
    mask = torch.rand(N, K, generator=g) < 0.1
    pw = PackedWeight.from_codes((W > 0)[None], torch.full((1, N, -(-K // group)), 0.5), torch.zeros(1, N, -(-K // group)),
                                 group, salient_mask=mask, salient_mag=torch.randint(0, 127, (N, K), generator=g),
                                 salient_scale=torch.full((N,), 0.01))
    one_pass = refit_scales(pw, W, H)
    monkeypatch.setattr(scales, "REFIT_CHUNK_BYTES", 8 * K * 30)  # chunks of 30 rows and 30 columns
    chunked = refit_scales(pw, W, H)
    assert torch.equal(one_pass.alpha, chunked.alpha) and torch.equal(one_pass.mu, chunked.mu)
    assert hessian_weighted_error(W, chunked.decode(), H) < hessian_weighted_error(W, pw.decode(), H)

