import pytest
import torch

from llmbin.algorithms.levels import (
    argmin0,
    compose,
    nearest_signs,
    residual_fit,
    row_slices,
    sign_patterns,
    squared_error,
    uniform_init,
)
from llmbin.algorithms.scales import refine_fit, solve_scales


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


def test_row_slices_cover_every_row_once_in_balanced_pieces():
    for n, row_bytes, budget in ((10, 1, 3), (468, 8960 * 24, 32 << 20), (7, 100, 10**9), (5, 100, 1)):
        slices = row_slices(n, row_bytes, budget)
        assert torch.equal(torch.cat([torch.arange(n)[s] for s in slices]), torch.arange(n))
        sizes = [s.stop - s.start for s in slices]
        assert max(sizes) - min(sizes) <= 1 and max(sizes) * row_bytes <= max(budget, row_bytes) * 2
    assert len(row_slices(7, 100, 10**9)) == 1


def test_whole_matrix_steps_in_row_slices_equal_one_pass(monkeypatch):
    """Nearest signs and the least-squares scales run over slices of rows (their temporaries are
    2^P and P + 1 copies of the rows); every row comes out as in one pass."""
    import llmbin.algorithms.levels as levels

    g = torch.Generator().manual_seed(0)
    W = torch.randn(45, 70, generator=g)
    keep = torch.rand(45, 70, generator=g) > 0.2
    mu, alpha = uniform_init(W, keep, 2)
    signs, scales = nearest_signs(W, mu, alpha), solve_scales(W, keep, nearest_signs(W, mu, alpha))
    monkeypatch.setattr(levels, "ROW_CHUNK_BYTES", 70 * 4 * 8 * 6)  # slices of about 6 rows
    assert len(row_slices(45, 70 * 4 * 8)) > 5
    assert torch.equal(nearest_signs(W, mu, alpha), signs)
    for a, b in zip(solve_scales(W, keep, signs), scales):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
