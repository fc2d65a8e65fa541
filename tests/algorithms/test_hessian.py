import pytest
import torch

from llmbin.algorithms.hessian import accumulate_hessian, act_order, inverse_cholesky, permute_hessian, prepare_hessian
from llmbin.errors import LlmbinError


def test_running_hessian_equals_batch_formula():
    X = torch.randn(3, 50, 8, dtype=torch.float64)
    H, n = torch.zeros(8, 8, dtype=torch.float64), 0
    for batch in X:
        H, n = accumulate_hessian(H, n, batch)
    flat = X.reshape(-1, 8)
    assert n == 150
    assert torch.allclose(H, 2 * flat.T @ flat / 150)


def test_dead_inputs_are_zeroed_and_damped():
    H = torch.diag(torch.tensor([2.0, 0.0, 4.0]))
    W = torch.ones(2, 3)
    W2, H2 = prepare_hessian(W, H, percdamp=0.5)
    assert torch.equal(W2[:, 1], torch.zeros(2)) and torch.equal(W2[:, 0], torch.ones(2))
    assert torch.allclose(torch.diag(H2), torch.tensor([2.0, 1.0, 4.0]) + 0.5 * 7 / 3)
    assert torch.equal(W, torch.ones(2, 3))  # inputs untouched


def test_inverse_cholesky_factorises_the_inverse(layer_problem):
    _, H = layer_problem
    U = inverse_cholesky(H.double())
    assert torch.allclose(U.T @ U, torch.linalg.inv(H.double()), atol=1e-8)
    assert torch.equal(U, torch.triu(U))


def test_indefinite_hessian_gets_a_clear_error():
    with pytest.raises(LlmbinError, match="percdamp"):
        inverse_cholesky(torch.tensor([[1.0, 2.0], [2.0, 1.0]]))


def test_act_order_sorts_inputs_by_decreasing_diagonal():
    H = torch.diag(torch.tensor([1.0, 3.0, 2.0, 3.0, 0.0]))
    assert act_order(H).tolist() == [1, 3, 2, 0, 4]  # stable: equal diagonals keep their order


def test_permute_hessian_equals_indexing_across_row_chunks():
    g = torch.Generator().manual_seed(0)
    H = torch.randn(1100, 1100, generator=g)  # more rows than one in-place chunk
    perm = torch.randperm(1100, generator=g)
    assert torch.equal(permute_hessian(H, perm), H[perm][:, perm])


@pytest.mark.parametrize("K", [7, 512, 1300])  # within one band, exactly one, and bands with a ragged last one
def test_outer_products_fill_both_triangles_from_the_upper_bands(K):
    from llmbin.algorithms.hessian import add_outer_products

    g = torch.Generator().manual_seed(0)
    X = torch.randn(2, 40, K, dtype=torch.float64, generator=g)
    S = torch.zeros(K, K, dtype=torch.float64)
    for batch in X:  # the second call must add to the mirrored lower triangle too
        assert add_outer_products(S, batch) == 40
    flat = X.reshape(-1, K)
    assert torch.allclose(S, flat.T @ flat) and torch.equal(S, S.T)
