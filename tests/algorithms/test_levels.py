import pytest
import torch

from llmbin.algorithms.levels import (
    argmin0,
    compose,
    nearest_signs,
    residual_fit,
    sign_patterns,
    squared_error,
    uniform_init,
)
from llmbin.algorithms.scales import refine_fit


def test_sign_patterns_enumerate_planes_as_bits():
    p = sign_patterns(3)
    assert p.shape == (8, 3)
    for i in range(8):
        assert p[i].tolist() == [1.0 if (i >> b) & 1 else -1.0 for b in range(3)]


def test_argmin0_matches_argmin_including_ties():
    d = torch.randint(0, 3, (5, 7, 9)).float()
    assert torch.equal(argmin0(d), d.argmin(0))


def test_nearest_signs_pick_the_closest_of_all_levels():
    g = torch.Generator().manual_seed(0)
    W, mu, alpha = torch.randn(6, 50, generator=g), torch.randn(6, generator=g), torch.rand(2, 6, generator=g)
    Q = compose(mu, alpha, nearest_signs(W, mu, alpha))
    levels = mu[None] + sign_patterns(2) @ alpha  # (4, N)
    best = (W[None] - levels[:, :, None]).abs().amin(0)
    assert torch.allclose((W - Q).abs(), best)


def test_residual_fit_is_billms_closed_form():
    w = torch.tensor([[1.0, 2.0, 4.0, -3.0, 10.0]])
    keep = torch.tensor([[True, True, True, True, False]])
    mu, alpha, r = residual_fit(w, keep, 1)
    assert mu.item() == pytest.approx(1.0) and alpha.item() == pytest.approx((0 + 1 + 3 + 4) / 4)
    assert r[0, 4] == 0 and torch.allclose(r[0, :4], torch.tensor([-2.0, -1.0, 1.0, -2.0]))


def test_refinement_lowers_the_error_of_every_initialisation():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(20, 128, generator=g) ** 3
    keep = torch.rand(20, 128, generator=g) > 0.2
    for mu, alpha in (uniform_init(W, keep, 2), residual_fit(W, keep, 2)[:2]):
        before = squared_error(W, keep, mu, alpha)
        after = squared_error(W, keep, *refine_fit(W, keep, mu, alpha, 20))
        assert (after <= before + 1e-5).all() and after.sum() < 0.95 * before.sum()


def test_uniform_init_is_the_min_max_grid():
    W = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    mu, alpha = uniform_init(W, torch.ones_like(W, dtype=torch.bool), 2)
    assert torch.allclose(compose(mu, alpha, nearest_signs(W, mu, alpha)), W)


def test_one_plane_fit_is_least_squares_optimal_over_the_binarized_weights_only():
    """PB-LLM's μ ± α: the salient entries (outside ``keep``) must not pull the scale."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 300, generator=g, dtype=torch.float64) + 0.3
    keep = torch.rand(16, 300, generator=g) > 0.1
    W[~keep] = 50.0
    n = keep.sum(1)
    mu, alpha = refine_fit(W, keep, (W * keep).sum(1) / n, ((W - 0.3).abs() * keep).sum(1)[None] / n, iters=20)
    signs = nearest_signs(W, mu, alpha)[0]
    error = lambda m, a: ((W - m[:, None] - a[:, None] * signs) ** 2 * keep).sum(1)  # noqa: E731
    best = error(mu, alpha[0])
    for dmu, dalpha in [(1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)]:
        assert (best <= error(mu + dmu, alpha[0] + dalpha)).all()
    assert alpha.max() < 2  # the 50.0 entries did not count
    reference = ((W * keep).abs().mean(1))  # the reference PB-LLM's scale: zeros included, no mean
    assert (best < ((W - reference[:, None] * torch.where(W >= 0, 1.0, -1.0)) ** 2 * keep).sum(1)).all()
