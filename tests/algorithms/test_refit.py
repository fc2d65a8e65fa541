import torch

from llmbin.algorithms.metrics import hessian_weighted_error
from llmbin.algorithms.pbllm import refit_binary_scales
from llmbin.algorithms.refit import refit_scales
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
    W, H = layer_problem
    upper = W > 0
    pw = PackedWeight.from_codes(upper[None], torch.ones(1, W.shape[0], 1), torch.zeros(1, W.shape[0], 1), W.shape[1])
    new = refit_scales(pw, W, H)
    mu, alpha = refit_binary_scales(W, H, torch.ones_like(upper), upper, torch.zeros_like(W))
    assert torch.allclose(new.mu[0, :, 0].double(), mu, rtol=2e-3, atol=1e-6)
    assert torch.allclose(new.alpha[0, :, 0].double(), alpha, rtol=2e-3, atol=1e-6)
