"""``torch.ops.llmbin.packed_linear``: results, both CPU paths, tracing, and the fallback."""
import warnings

import pytest
import torch

import llmbin.kernels.cpu as cpu_module
import llmbin.kernels.ops as ops
from llmbin.kernels.ops import packed_linear
from llmbin.kernels.plan import build_plan
from tests.kernels.conftest import LAYOUTS, LUT_TOL, assert_matches_reference, random_packed


@pytest.mark.parametrize("layout", LAYOUTS)
def test_operator_matches_reference_on_matvec_and_band_paths(ext, layout):
    pw = random_packed(layout, 37, 200, 128)
    plan = build_plan(pw)
    for batch in (1, 7, 128):  # 128 × products is past LUT_MAX_WORK: decoded bands + GEMM
        x = torch.randn(batch, 200)
        assert_matches_reference(packed_linear(x, plan), x, pw, LUT_TOL)


def test_band_path_covers_every_row(ext, monkeypatch):
    monkeypatch.setattr(ops, "BAND_BYTES", 16 * 4 * 200)  # 16-row bands, the last one partial
    pw = random_packed("billm", 37, 200, 64)
    x = torch.randn(128, 200)
    assert_matches_reference(packed_linear(x, build_plan(pw)), x, pw)


def test_leading_dimensions_and_dtype_are_kept(ext):
    pw = random_packed("pb-llm", 5, 96, 96)
    x = torch.randn(2, 3, 96, dtype=torch.bfloat16)
    y = packed_linear(x, build_plan(pw))
    assert y.shape == (2, 3, 5) and y.dtype == torch.bfloat16
    ref = (x.double() @ pw.decode(torch.float64).T)
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("layout", ["arb-rc", "pb-llm"])
def test_operator_passes_opcheck_and_traces_with_its_fake(ext, layout):
    plan = build_plan(random_packed(layout, 6, 130, 64))
    args = (torch.randn(3, 130), *plan.op_args())
    torch.library.opcheck(torch.ops.llmbin.packed_linear.default, args)
    compiled = torch.compile(lambda x: packed_linear(x, plan) * 2, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 130)
    torch.testing.assert_close(compiled(x), packed_linear(x, plan) * 2)


def test_without_a_compiled_kernel_the_operator_falls_back_to_plain_torch(monkeypatch):
    monkeypatch.setattr(ops, "extension", lambda: None)
    pw = random_packed("billm", 9, 100, 64)
    x = torch.randn(2, 100)
    assert_matches_reference(packed_linear(x, build_plan(pw)), x, pw)


def test_a_failed_build_warns_once_in_one_line(monkeypatch):
    from torch.utils import cpp_extension

    def broken(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    cpu_module.extension.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", broken)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cpu_module.extension() is None and cpu_module.extension() is None
        assert len(caught) == 1
        message = str(caught[0].message)
        assert "\n" not in message and "Ninja is required" in message and "reference path" in message
    finally:
        cpu_module.extension.cache_clear()
