"""Seeded orthogonal transforms: orthogonality, the fast apply against the dense matrix,
the incoherence bound, determinism, and the stored description."""
import math

import pytest
import torch

from llmbin.packing.rotation import MAX_ODD_FACTOR, LayerRotation, OrthogonalTransform, layer_seed, split_size

SIZES = [1, 2, 3, 12, 96, 576, 1536, 2048]  # odd, powers of two, SmolLM2's 576 = 64·9 and 1536 = 512·3


@pytest.mark.parametrize("n", SIZES)
def test_the_transform_is_orthogonal_and_its_fast_apply_is_the_dense_matrix(n):
    T = OrthogonalTransform(n, seed=7, dtype=torch.float64)
    M = T.matrix()
    torch.testing.assert_close(M @ M.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(5, 3, n, dtype=torch.float64)
    torch.testing.assert_close(T.apply(x), x @ M.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(T.apply_transpose(x), x @ M, rtol=0, atol=1e-12)
    torch.testing.assert_close(T.apply_transpose(T.apply(x)), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_every_entry_is_at_most_sqrt_2_over_n(n):
    """The incoherence that spreads an outlier over the whole row: no entry dominates."""
    M = OrthogonalTransform(n, seed=1, dtype=torch.float64).matrix()
    assert M.abs().max() <= math.sqrt(2 / n) + 1e-12
    if n & (n - 1) == 0:  # a power of two: a true Hadamard matrix, all entries ±1/√n
        torch.testing.assert_close(M.abs(), torch.full_like(M, 1 / math.sqrt(n)))


def test_the_seed_alone_determines_the_transform():
    a, b, c = (OrthogonalTransform(576, seed).matrix() for seed in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the signs come from torch's CPU generator as integers: pinned, so a change that would
    # make old checkpoints decode with other signs fails here
    assert OrthogonalTransform(16, seed=0).signs.tolist() == [-1, 1, 1, -1, 1, 1, 1, 1, 1, 1, 1, -1, -1, 1, -1, -1]
    assert layer_seed(0, "0.self_attn.q_proj:input") == 5026742851250399726  # sha256: the same everywhere
    assert layer_seed(0, "3.self_attn.q_proj:input") == layer_seed(0, "3.self_attn.q_proj:input")
    assert len({layer_seed(0, "0.a:input"), layer_seed(0, "1.a:input"), layer_seed(1, "0.a:input")}) == 3
    assert 0 <= layer_seed(12345, "x") < 2**63


def test_split_size_uses_hadamard_factors_up_to_64_and_refuses_huge_odd_factors():
    assert split_size(4096) == ([64, 64], 1)
    assert split_size(576) == ([64], 9)
    assert split_size(1536) == ([64, 8], 3)
    assert split_size(11008) == ([64, 4], 43)
    assert split_size(7) == ([], 7)
    with pytest.raises(ValueError, match="odd factor"):
        split_size(2 * (MAX_ODD_FACTOR + 2) + 2)  # 2 · (an odd number over the cap)


def test_the_stored_description_round_trips_and_unknown_constructions_are_refused():
    for rotation in (LayerRotation(5), LayerRotation(5, 9)):
        assert LayerRotation.from_metadata(rotation.metadata()) == rotation
    assert LayerRotation.from_metadata(None) is None
    with pytest.raises(ValueError, match="unknown rotation construction 'givens'"):
        LayerRotation.from_metadata({"construction": "givens", "input_seed": 1, "output_seed": None})
    assert LayerRotation(5, 9).storage_bits() == 2 + 2 * 63
