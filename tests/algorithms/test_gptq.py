import torch

from llmbin.algorithms.gptq import gptq_reconstruct, gptq_reconstruct_scored
from llmbin.algorithms.hessian import inverse_cholesky, prepare_hessian
from llmbin.algorithms.metrics import hessian_weighted_error, sqnr_db
from llmbin.algorithms.scales import refine_fit


def test_identity_format_reproduces_the_weights(layer_problem):
    W, H = layer_problem
    W, H = prepare_hessian(W, H, 0.01)
    Q = gptq_reconstruct(W, inverse_cholesky(H), lambda w, j: w, blocksize=32)
    assert torch.allclose(Q, W, atol=1e-6)


def test_block_size_does_not_change_the_result(layer_problem):
    W, H = layer_problem
    W, H = prepare_hessian(W.double(), H.double(), 0.01)
    U = inverse_cholesky(H)
    rtn = lambda w, j: torch.round(w * 20) / 20  # noqa: E731
    assert torch.allclose(gptq_reconstruct(W, U, rtn, 7), gptq_reconstruct(W, U, rtn, 128), atol=1e-9)


def test_gptq_binarization_beats_plain_sign_binarization(layer_problem):
    W, H = layer_problem
    W, H = prepare_hessian(W, H, 0.01)
    mu, alpha = refine_fit(W, torch.ones_like(W, dtype=torch.bool), W.mean(1), W.std(1)[None], iters=20)
    binarize = lambda w, m, a: m + a * torch.where(w >= m, 1.0, -1.0)  # noqa: E731
    rtn = binarize(W, mu[:, None], alpha[0, :, None])
    gptq = gptq_reconstruct(W, inverse_cholesky(H), lambda w, j: binarize(w, mu, alpha[0]))
    assert hessian_weighted_error(W, gptq, H) < 0.95 * hessian_weighted_error(W, rtn, H)


def test_scored_row_error_is_the_hessian_weighted_error(layer_problem):
    # the OBS identity: GPTQ's accumulated column errors equal (w - q) H (w - q)ᵀ per row, for any format
    W, H = layer_problem
    W, H = prepare_hessian(W.double(), H.double(), 0.01)
    rtn = lambda w, j: torch.round(w * 7) / 7  # noqa: E731
    Q, row_error = gptq_reconstruct_scored(W, inverse_cholesky(H), rtn, 16)
    E = W - Q
    assert torch.allclose(row_error, ((E @ H) * E).sum(dim=1), rtol=1e-9)
    assert torch.equal(Q, gptq_reconstruct(W, inverse_cholesky(H), rtn, 16))


def test_sqnr():
    x = torch.ones(100, dtype=torch.float64)
    assert sqnr_db(x, x) == float("inf")
    assert abs(sqnr_db(x, x * 1.1) - 20.0) < 1e-9
