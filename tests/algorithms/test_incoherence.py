"""Incoherence processing: the rotated problem is the same problem, every method runs in it,
and it pays where the Hessian is uneven (the case QuIP's analysis covers)."""
import pytest
import torch

from llmbin.algorithms.incoherence import check_rotatable, layer_rotation, rotate_problem
from llmbin.algorithms.layer import quantize_layer
from llmbin.algorithms.metrics import hessian_weighted_error
from llmbin.config import make_config
from llmbin.errors import LlmbinError
from llmbin.packing.packed_weight import PackedWeight
from llmbin.packing.rotation import LayerRotation
from llmbin.registry import method_function
from tests.algorithms.test_methods import SETTINGS

ROTATIONS = [LayerRotation(11), LayerRotation(11, 12)]


@pytest.mark.parametrize("rotation", ROTATIONS)
def test_the_layer_output_error_is_the_same_in_both_bases(rotation, layer_problem):
    W, H = layer_problem
    Wr, Hr = rotate_problem(W, H, rotation)
    T, S = (None if t is None else t.matrix() for t in rotation.transforms(tuple(W.shape), dtype=torch.float64))
    S = torch.eye(W.shape[0], dtype=torch.float64) if S is None else S
    torch.testing.assert_close(Wr.double(), S @ W.double() @ T.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(Hr.double(), T @ H.double() @ T.T, rtol=1e-5, atol=1e-4)
    assert torch.equal(Hr, Hr.T)
    Q = torch.randn_like(Wr) * 0.05  # any candidate in the rotated basis
    assert hessian_weighted_error(Wr, Q, Hr) == pytest.approx(hessian_weighted_error(W, S.T @ Q.double() @ T, H), rel=1e-4)


@pytest.mark.parametrize("method,options", SETTINGS)
def test_every_method_runs_rotated_and_its_dense_weight_is_in_the_models_basis(method, options, layer_problem):
    W, H = layer_problem
    config = make_config(method, **options)
    rotation = ROTATIONS[1]
    packed = quantize_layer(method_function(config), W, H, config, rotation)
    assert packed.rotation == rotation
    Wr, Hr = rotate_problem(W, H, rotation)
    assert hessian_weighted_error(W, packed.dense(), H) == pytest.approx(
        hessian_weighted_error(Wr, packed.decode(), Hr), rel=1e-4)
    back = PackedWeight.from_tensors(packed.tensors("l"), "l", packed.metadata())
    assert back.rotation == rotation and torch.equal(back.dense(), packed.dense())
    assert packed.storage_bits() == PackedWeight.from_tensors(
        packed.tensors("l"), "l", {**packed.metadata(), "rotation": None}).storage_bits() + rotation.storage_bits()


@pytest.mark.parametrize("method,options", [("gptq", {"bits": 2}), ("db-llm", {}), ("arb-rc", {"blocksize": 32})])
def test_rotation_lowers_the_error_of_hessian_guided_methods_on_an_uneven_hessian(method, options, layer_problem):
    W, H = layer_problem  # inputs scaled 0.1 … 4 and correlated: H is far from incoherent
    config = make_config(method, **options)
    fn = method_function(config)
    plain = hessian_weighted_error(W, quantize_layer(fn, W, H, config).decode(), H)
    for rotation in ROTATIONS:
        rotated = hessian_weighted_error(W, quantize_layer(fn, W, H, config, rotation).dense(), H)
        assert rotated < 0.8 * plain


def test_layer_rotation_follows_the_config():
    assert layer_rotation(make_config("db-llm"), "0.q") is None
    one = layer_rotation(make_config("db-llm", rotate="input"), "0.q")
    assert one.output_seed is None and one == layer_rotation(make_config("db-llm", rotate="input"), "0.q")
    both = layer_rotation(make_config("db-llm", rotate="both", rotate_seed=3), "0.q")
    assert both.output_seed is not None and both.input_seed != one.input_seed
    assert layer_rotation(make_config("db-llm", rotate="both"), "1.q") != layer_rotation(make_config("db-llm", rotate="both"), "0.q")


def test_sizes_that_cannot_be_rotated_are_refused_with_the_setting_that_works():
    odd = 2 * 4099  # an odd factor over MAX_ODD_FACTOR
    check_rotatable(make_config("db-llm"), {"a": (odd, odd)})  # nothing rotated, nothing refused
    check_rotatable(make_config("db-llm", rotate="input"), {"a": (odd, 576)})  # only the input side is rotated
    with pytest.raises(LlmbinError, match=r"^--rotate both: a has output size 8198, .*odd factor 4099.*; use --rotate input$"):
        check_rotatable(make_config("db-llm", rotate="both"), {"a": (odd, 576)})
    with pytest.raises(LlmbinError, match=r"^--rotate both: a has output size 8198, .*\(and 1 more\); use --rotate none$"):
        check_rotatable(make_config("db-llm", rotate="both"), {"a": (odd, 576), "b": (576, odd)})


@pytest.mark.parametrize("rotation", ROTATIONS)
def test_the_rotation_runs_in_chunks_and_equals_the_whole_matrix_transform(rotation, layer_problem, monkeypatch):
    """A 70B down_proj's H is 3.3 GB: the transform's Kronecker steps copy a chunk of rows or
    columns at a time, never the matrix, and give the whole-matrix result."""
    import llmbin.algorithms.incoherence as incoherence
    from llmbin.packing.rotation import OrthogonalTransform

    W, H = layer_problem
    whole = rotate_problem(W, H, rotation)
    H_before = H.clone()
    budget, seen, real = 4 * 96 * 10, [], OrthogonalTransform.apply
    monkeypatch.setattr(incoherence, "ROTATE_CHUNK_BYTES", budget)  # about 10 rows or columns at once
    monkeypatch.setattr(OrthogonalTransform, "apply", lambda self, x: seen.append(x.numel() * 4) or real(self, x))
    chunked = rotate_problem(W, H, rotation)
    assert len(seen) > 10 and max(seen) <= budget
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    assert torch.equal(chunked[1], chunked[1].T) and torch.equal(H, H_before)
