"""The quantized-table kernel: fp32 activations times 8- or 4-bit codes with fp16 group scales,
against the float64 product with the decoded table, at awkward shapes, on every path."""
import pytest
import torch

from llmbin.kernels import table as table_kernel
from llmbin.kernels.table import table_linear
from llmbin.packing.table import QuantTable


def _assert_close(y, x, table):
    W = table.dense(torch.float64)
    scale = x.double().abs() @ W.abs().T + 1e-12
    assert torch.isfinite(y).all(), "outputs left unwritten or non-finite"
    err = ((y.double() - x.double() @ W.T).abs() / scale).max().item()
    assert err < 2e-6, f"relative error {err:.2e}"  # fp32 summation, nothing more


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("simd", [True, False])
def test_kernel_matches_the_float64_product_at_awkward_shapes(ext, bits, simd):
    g = torch.Generator().manual_seed(0)
    for B in (1, 3, 8):
        for N in (1, 3, 130):
            for K, group in ((2, 2), (33, 8), (64, 64), (100, 32), (577, 64), (96, 96)):
                table = QuantTable.quantize(torch.randn(N, K, generator=g), bits, group)
                x = torch.randn(B, K, generator=g)
                out = torch.full((B, N), float("nan"))  # poisoned: every output must be written
                ext.table_linear(x, table.codes, table.scale, bits, group, out, simd)
                _assert_close(out, x, table)


@pytest.mark.parametrize("rows", [1, 8, 9, 40])
@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_every_path_gives_the_product(ext, rows, use_kernel, bits, monkeypatch):
    monkeypatch.setattr(table_kernel, "BAND_BYTES", 4 * 33 * 20)  # bands of 20 rows: 130 = 6 bands and a ragged one
    table = QuantTable.quantize(torch.randn(130, 33), bits, 16)
    x = torch.randn(2, rows, 33)
    y = table_linear(x, table, use_kernel=use_kernel)
    assert y.shape == (2, rows, 130) and y.dtype == torch.float32
    _assert_close(y.reshape(-1, 130), x.reshape(-1, 33), table)


def test_wrong_shapes_are_clear_errors(ext):
    table = QuantTable.quantize(torch.randn(3, 8), 8, 4)
    with pytest.raises(ValueError, match="x has 5 features, the table 8"):
        table_linear(torch.randn(1, 5), table)
    with pytest.raises(RuntimeError, match="codes must be contiguous int8"):
        ext.table_linear(torch.randn(1, 8), table.codes.to(torch.uint8), table.scale, 8, 4, torch.empty(1, 3))
    with pytest.raises(RuntimeError, match=r"scale must be contiguous float16 \(N, ceil\(K / group\)\)"):
        ext.table_linear(torch.randn(1, 8), table.codes, table.scale, 8, 8, torch.empty(1, 3))
    with pytest.raises(RuntimeError, match="bits must be 8 or 4"):
        ext.table_linear(torch.randn(1, 8), table.codes, table.scale, 2, 4, torch.empty(1, 3))
