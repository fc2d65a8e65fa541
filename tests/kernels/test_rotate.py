"""The rotation kernel: a rotated layer's transforms T·x and Tᵀ·x of a few activation rows."""
import pytest
import torch

from llmbin.kernels import rotate as rotate_module
from llmbin.kernels.rotate import rotate
from llmbin.packing.rotation import OrthogonalTransform

# Sizes: no factor, one DCT factor alone, a Hadamard factor alone, odd parts with one and several
# Hadamard factors, Qwen2.5's 1536 = 64·8·3 and 8960 = 64·4·35.
SIZES = [1, 7, 64, 96, 576, 1536, 8960]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("simd", [True, False])
def test_kernel_matches_the_dense_float64_transform(ext, n, transpose, simd):
    T = OrthogonalTransform(n, seed=5)
    M = T.matrix().double()
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n))
    out = torch.full_like(x, float("nan"))  # poisoned: every output must be written
    odd = T.factors[-1] if T.factors and T.factors[-1].shape[0] % 2 else torch.empty(0, 0)
    ext.kron_transform(x, T.signs, n // max(1, odd.shape[0]), odd, transpose, out, simd)
    expected = x.double() @ (M if transpose else M.T)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("n", [8, 16, 64, 4096])
def test_the_vector_walsh_hadamard_transform_adds_as_the_portable_loop_does(ext, n):
    # powers of two are the transform alone: AVX2 and the portable loop agree bit for bit
    T = OrthogonalTransform(n, seed=5)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n))
    for transpose in (False, True):
        simd, portable = torch.empty_like(x), torch.empty_like(x)
        ext.kron_transform(x, T.signs, n, torch.empty(0, 0), transpose, simd, True)
        ext.kron_transform(x, T.signs, n, torch.empty(0, 0), transpose, portable, False)
        assert torch.equal(simd, portable)


@pytest.mark.parametrize("rows", [1, 8, 9, 40])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_every_path_gives_the_transform_and_its_inverse(ext, rows, use_kernel):
    T = OrthogonalTransform(576, seed=1)
    x = torch.randn(2, rows, 576)
    y = rotate(x, T, use_kernel=use_kernel)
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, T.apply(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(rotate(y, T, transpose=True, use_kernel=use_kernel), x, rtol=0, atol=1e-5)


def test_small_batches_take_the_kernel_and_large_ones_torch(ext, monkeypatch):
    calls = []
    monkeypatch.setattr(rotate_module, "extension", lambda: type("Ext", (), {
        "kron_transform": lambda self, *a: calls.append(a[0].shape) or ext.kron_transform(*a)})())
    T = OrthogonalTransform(96, seed=2)
    rotate(torch.randn(rotate_module.MAX_ROWS, 96), T)
    rotate(torch.randn(rotate_module.MAX_ROWS + 1, 96), T)
    rotate(torch.randn(1, 96, dtype=torch.float64), OrthogonalTransform(96, 2, dtype=torch.float64))  # float32 only
    assert calls == [(rotate_module.MAX_ROWS, 96)]


def test_compiled_calls_keep_the_operator(ext):
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    T = OrthogonalTransform(1536, seed=3)
    x = torch.randn(1, 1536)
    compiled = torch.compile(lambda v: rotate(rotate(v, T), T, transpose=True), fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(x), x, rtol=0, atol=1e-5)
    targets = [node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    rotations = [t for t in targets if t in (torch.ops.llmbin_cpu.rotate, torch.ops.llmbin_cpu.rotate.default)]
    assert len(rotations) == 2 and torch.tensordot not in targets  # one C++ call per transform, no products


def test_wrong_shapes_are_clear_errors(ext):
    T = OrthogonalTransform(96, seed=0)
    with pytest.raises(ValueError, match="x has 95 features, the transform 96"):
        rotate(torch.randn(1, 95), T)
    dct = T.factors[-1]  # 96 = 32 · 3
    with pytest.raises(RuntimeError, match="hadamard · m = 96, not the 95 features"):
        ext.kron_transform(torch.randn(1, 95), T.signs[:95].contiguous(), 32, dct, False, torch.empty(1, 95))
    with pytest.raises(RuntimeError, match="hadamard must be a power of two"):
        ext.kron_transform(torch.randn(1, 96), T.signs, 24, torch.empty(0, 0), False, torch.empty(1, 96))
    with pytest.raises(RuntimeError, match="out must be"):
        ext.kron_transform(torch.randn(1, 96), T.signs, 32, dct, False, torch.empty(2, 96))
