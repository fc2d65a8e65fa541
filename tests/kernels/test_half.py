"""The 16-bit-weight kernel: fp32 activations times a bf16/fp16 weight widened exactly."""
import pytest
import torch

from llmbin.kernels import half
from llmbin.kernels.half import half_linear


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.double() @ w.double().T  # the widening is exact, so this is the true product


def _assert_close(y, x, w):
    scale = x.double().abs() @ w.double().abs().T + 1e-12
    assert torch.isfinite(y).all(), "outputs left unwritten or non-finite"
    err = ((y.double() - _reference(x, w)).abs() / scale).max().item()
    assert err < 2e-6, f"relative error {err:.2e}"  # fp32 summation, nothing more


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("simd", [True, False])
def test_kernel_matches_the_float64_product_at_awkward_shapes(ext, dtype, simd):
    g = torch.Generator().manual_seed(0)
    for B in (1, 3, 8):
        for N in (1, 3, 130):
            for K in (1, 7, 63, 577):
                x = torch.randn(B, K, generator=g)
                w = (torch.randn(N, K, generator=g) * 0.1).to(dtype)
                out = torch.full((B, N), float("nan"))  # poisoned: every output must be written
                ext.half_linear(x, w, out, simd)
                _assert_close(out, x, w)


@pytest.mark.parametrize("rows", [1, 8, 9, 40])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_every_path_gives_the_product(ext, rows, use_kernel, monkeypatch):
    monkeypatch.setattr(half, "BAND_BYTES", 4 * 33 * 20)  # bands of 20 rows: 130 = 6 bands and a ragged one
    x = torch.randn(2, rows, 33)
    w = torch.randn(130, 33).to(torch.float16)
    y = half_linear(x, w, use_kernel=use_kernel)
    assert y.shape == (2, rows, 130) and y.dtype == torch.float32
    _assert_close(y.reshape(-1, 130), x.reshape(-1, 33), w)


def test_wrong_dtypes_and_shapes_are_clear_errors(ext):
    with pytest.raises(TypeError, match="float32 activations and a bf16/fp16 weight"):
        half_linear(torch.randn(1, 4), torch.randn(3, 4))
    with pytest.raises(TypeError, match="float32 activations"):
        half_linear(torch.randn(1, 4).half(), torch.randn(3, 4).half())
    with pytest.raises(RuntimeError, match="w must be contiguous bfloat16 or float16"):
        ext.half_linear(torch.randn(1, 4), torch.randn(3, 5).half(), torch.empty(1, 3))
    with pytest.raises(RuntimeError, match="out must be"):
        ext.half_linear(torch.randn(1, 4), torch.randn(3, 4).half(), torch.empty(1, 4))
