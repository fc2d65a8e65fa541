"""``BinaryLinear``: the documented entry points, kernel vs reference, and plan invalidation."""
import pytest
import torch

import llmbin
from llmbin.errors import LlmbinError
from llmbin.nn import BinaryLinear
from tests.conftest import tiny_model


def test_from_float_is_sign_times_the_rows_mean_magnitude():
    linear = torch.nn.Linear(70, 5)
    layer = BinaryLinear.from_float(linear)
    W = linear.weight.detach()
    expected = torch.where(W >= 0, 1.0, -1.0) * W.abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(layer.packed().decode(), expected, rtol=1e-3, atol=0)  # α is stored in fp16
    assert torch.equal(layer.bias, linear.bias)


@pytest.mark.parametrize("shape", [(1, 70), (7, 70), (2, 32, 70)])
def test_kernel_forward_matches_the_reference_forward(ext, shape, monkeypatch):
    layer = BinaryLinear.from_float(torch.nn.Linear(70, 3))
    x = torch.randn(*shape)
    fast = layer(x)
    monkeypatch.setenv("LLMBIN_KERNEL", "reference")
    torch.testing.assert_close(fast, layer(x), rtol=1e-3, atol=1e-3)  # table lookup rounds at ~1e-4
    monkeypatch.setenv("LLMBIN_KERNEL", "exact")
    exact = torch.nn.functional.linear(x, layer.packed().decode(), layer.bias)
    torch.testing.assert_close(layer(x), exact, rtol=1e-5, atol=1e-5)


def test_an_unknown_kernel_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LLMBIN_KERNEL", "fastest")
    with pytest.raises(LlmbinError, match="LLMBIN_KERNEL='fastest'.*auto, exact, reference"):
        BinaryLinear.from_float(torch.nn.Linear(8, 2))(torch.randn(1, 8))


def test_the_plan_is_rebuilt_when_weights_are_loaded_in_place(ext):
    a, b = (BinaryLinear.from_float(torch.nn.Linear(64, 4)) for _ in range(2))
    x = torch.randn(1, 64)
    a(x)  # caches a's plan
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(a(x), b(x))


def test_loaded_checkpoint_generates_the_same_tokens_with_kernel_and_reference(ext, tmp_path, monkeypatch):
    calib = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(0))
    model = llmbin.quantize(tiny_model("llama"), llmbin.PBLLMConfig(), calib, progress=False)
    llmbin.save(model, None, tmp_path / "ckpt")
    loaded = llmbin.load(tmp_path / "ckpt")
    prompt = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=32, do_sample=False, pad_token_id=0)
    fast = loaded.generate(prompt, **kwargs)
    monkeypatch.setenv("LLMBIN_KERNEL", "reference")
    assert torch.equal(fast, loaded.generate(prompt, **kwargs))


def test_scales_that_require_grad_get_gradients(ext):
    layer = BinaryLinear.from_float(torch.nn.Linear(64, 4))
    layer.alpha.requires_grad_(True)
    layer(torch.randn(2, 64)).sum().backward()
    assert layer.alpha.grad is not None and layer.alpha.grad.abs().sum() > 0


@pytest.mark.parametrize("batch", [1, 256])  # the C++ matrix-vector kernel, then decoded bands + GEMM
def test_inputs_that_require_grad_get_gradients(ext, batch):
    # the kernels have no backward, so autograd must take the reference path, not a detached output
    layer = BinaryLinear.from_float(torch.nn.Linear(64, 4))
    x = torch.randn(batch, 64, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.packed().decode().sum(0).expand(batch, 64))


def test_long_inputs_use_the_light_plan_until_a_short_one_builds_the_full_plan(ext):
    from llmbin.kernels.ops import LUT_MAX_WORK
    from tests.kernels.conftest import LUT_TOL, assert_matches_reference, random_packed

    pw = random_packed("pb-llm", 40, 130, 130)
    layer = BinaryLinear(pw)
    long, short = torch.randn(LUT_MAX_WORK + 1, 130), torch.randn(3, 130)
    assert_matches_reference(layer(long), long, pw)
    assert layer._plan is None and layer._light[1].salient_stream and layer._light[1].tiles.numel() == 0
    assert_matches_reference(layer(short), short, pw, LUT_TOL)
    assert layer._light is None and layer._plan[1].tiles.numel() > 0 and not layer._plan[1].salient_stream
    assert layer.kernel_plan(LUT_MAX_WORK + 1) is layer._plan[1]  # once built, the full plan serves every call


@pytest.mark.parametrize("rows", [3, "long"])
def test_moving_the_layer_drops_its_plans(ext, rows):
    """The driver releases a finished block with ``.to("meta")``: no plan may outlive that, or a
    streamed run keeps every finished block's plans in memory."""
    import gc
    import weakref

    from llmbin.kernels.ops import LUT_MAX_WORK

    layer = BinaryLinear.from_float(torch.nn.Linear(130, 40))
    layer(torch.randn(LUT_MAX_WORK + 1 if rows == "long" else rows, 130))
    plan = weakref.ref((layer._plan or layer._light)[1])
    layer.to("meta")
    gc.collect()
    assert plan() is None and layer._plan is None and layer._light is None
    assert all(b.is_meta for b in layer.buffers())


def test_moving_the_layer_drops_the_dense_copy(ext):
    layer = BinaryLinear.from_float(torch.nn.Linear(64, 8))
    layer.dense_cache = True
    x = torch.randn(2, 64)
    y = layer(x)
    assert layer._dense is not None
    layer.to(torch.float64)
    assert layer._dense is None
    torch.testing.assert_close(layer(x.double()), y.double())


def _rotated_layer(N, K, rotation, seed=0):
    from dataclasses import replace

    torch.manual_seed(seed)
    linear = torch.nn.Linear(K, N)
    plain = BinaryLinear.from_float(linear)
    return BinaryLinear(replace(plain.packed(), rotation=rotation), linear.bias.detach().clone())


def _dense_float64_reference(layer, x):
    """``x·(Sᵀ·Ŵ'·T)ᵀ + b`` in float64 with the dense matrices: no fast transform involved."""
    T, S = layer.rotation.transforms((layer.out_features, layer.in_features), dtype=torch.float64)
    W = layer.packed().decode(torch.float64) @ T.matrix()
    if S is not None:
        W = S.matrix().T @ W
    return x.double() @ W.T + layer.bias.double()


@pytest.mark.parametrize("N,K", [(3, 70), (37, 576), (96, 1536), (64, 96)])
@pytest.mark.parametrize("both", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 300])  # matrix-vector, table lookup, band decode + GEMM
def test_rotated_kernel_forward_matches_a_dense_float64_reference(ext, N, K, both, rows):
    from llmbin.packing.rotation import LayerRotation

    layer = _rotated_layer(N, K, LayerRotation(21, 22 if both else None))
    x = torch.randn(rows, K)
    expected = _dense_float64_reference(layer, x)
    scale = expected.abs().max().item()
    torch.testing.assert_close(layer(x).double(), expected, rtol=0, atol=2e-3 * scale)  # table lookup rounds at ~1e-4
    assert layer(x).dtype == torch.float32
    # moved: the cached transforms are rebuilt for the new dtype (the kernel itself computes in float32)
    torch.testing.assert_close(layer.double()(x.double()), expected, rtol=0, atol=2e-3 * scale)


def test_a_rotated_layer_with_the_identity_codes_computes_the_transforms_product(ext, monkeypatch):
    """Ŵ' = I (N = K): the layer must compute Sᵀ·T (the exact kernel: no table-lookup rounding)."""
    monkeypatch.setenv("LLMBIN_KERNEL", "exact")
    from dataclasses import replace

    from llmbin.packing.packed_weight import PackedWeight
    from llmbin.packing.rotation import LayerRotation

    n = 96
    eye = torch.eye(n, dtype=torch.bool)
    # planes: +1 on the diagonal, -1 elsewhere; μ = α = 1/2 gives 1 on the diagonal, 0 elsewhere
    half = torch.full((1, n, 1), 0.5)
    packed = PackedWeight.from_codes(eye.unsqueeze(0), half, half, n)
    rotation = LayerRotation(3, 4)
    layer = BinaryLinear(replace(packed, rotation=rotation))
    T, S = (t.matrix() for t in rotation.transforms((n, n), dtype=torch.float64))
    x = torch.randn(2, n)
    torch.testing.assert_close(layer(x).double(), x.double() @ (S.T @ T).T, rtol=0, atol=1e-5)
