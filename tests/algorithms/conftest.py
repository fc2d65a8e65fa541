import pytest
import torch


@pytest.fixture
def layer_problem():
    """A weight and a Hessian from correlated, unevenly scaled inputs, as real layers have."""
    g = torch.Generator().manual_seed(0)
    K, N, n = 96, 40, 2048
    mix = torch.randn(K, K, generator=g) / K**0.5 + torch.eye(K)
    X = (torch.randn(n, K, generator=g) @ mix) * torch.linspace(0.1, 4.0, K)
    H = 2 * X.T @ X / n
    W = torch.randn(N, K, generator=g) * 0.05
    return W, H
