import torch

from llmbin.algorithms.binarize import binarize, fit_binary


def _error(W, keep, mu, alpha, signs=None):
    if signs is None:
        return ((W - binarize(W, mu[:, None], alpha[:, None])) ** 2 * keep).sum(1)
    return ((W - mu[:, None] - alpha[:, None] * signs) ** 2 * keep).sum(1)


def test_fit_is_least_squares_optimal_over_the_binarized_weights_only():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 300, generator=g, dtype=torch.float64) + 0.3
    keep = torch.rand(16, 300, generator=g) > 0.1
    W[~keep] = 50.0  # salient outliers must not pull the scale
    mu, alpha = fit_binary(W, keep)
    signs = torch.where(W >= mu[:, None], 1.0, -1.0).double()
    best = _error(W, keep, mu, alpha, signs)
    for dmu, dalpha in [(1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)]:
        assert (best <= _error(W, keep, mu + dmu, alpha + dalpha, signs)).all()
    assert alpha.max() < 2  # the 50.0 entries did not count


def test_fit_beats_the_reference_mean_abs_scale_with_zeros_included():
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    keep = torch.rand(32, 256, generator=torch.Generator().manual_seed(2)) > 0.1
    mu, alpha = fit_binary(W, keep)
    masked = W * keep  # reference PB-LLM: scale over the masked matrix, zeros included
    ref_alpha = masked.abs().mean(1)
    assert (_error(W, keep, mu, alpha) < _error(W, keep, torch.zeros(32, dtype=W.dtype), ref_alpha)).all()
