"""The C++ kernel against the float64 reference on every layout, shape and instruction set this
CPU has, with output buffers poisoned (NaN) before each call."""
from dataclasses import replace

import pytest
import torch

from llmbin.kernels.cpu import ISAS, extension
from llmbin.kernels.plan import build_plan
from tests.kernels.conftest import FP32_TOL, LAYOUTS, LUT_TOL, SHAPES, assert_matches_reference, random_packed

_ext = extension()
CPU_ISAS = _ext.available_isas() if _ext is not None else ["scalar"]


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matvec_kernel_matches_reference(ext, layout, isa):
    for i, (N, K, gs) in enumerate(SHAPES):
        pw = random_packed(layout, N, K, gs, seed=i)
        plan = build_plan(pw)
        for batch in (1, 7, 64):
            x = torch.randn(batch, K, generator=torch.Generator().manual_seed(batch))
            out = torch.full((batch, N), float("nan"))
            ext.packed_linear(x, *plan.op_args(), ISAS[isa], out)
            assert_matches_reference(out, x, pw, LUT_TOL if isa == "avx2-lut" else FP32_TOL)


@pytest.mark.parametrize("isa", [i for i in CPU_ISAS if i != "avx512"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_row_decoder_matches_reference(ext, layout, isa):
    for i, (N, K, gs) in enumerate(SHAPES):
        pw = random_packed(layout, N, K, gs, seed=i)
        plan = build_plan(pw)
        r0, r1 = N // 3, N
        out = torch.full((r1 - r0, plan.planes.shape[2] * 8), float("nan"))
        ext.decode_rows(*plan.op_args(), r0, r1, out, ISAS[isa])
        torch.testing.assert_close(out[:, :K].double(), pw.decode(torch.float64)[r0:r1], rtol=1e-6, atol=1e-6)
        assert not out[:, K:].any(), "columns past K must decode to zero"


def test_the_best_instruction_set_is_picked_and_missing_ones_are_refused(ext):
    assert ext.available_isas()[0] == "scalar"
    pw = random_packed("sign", 3, 64, 64)
    plan = build_plan(pw)
    x = torch.randn(1, 64)
    out = torch.empty(1, 3)
    for isa in ("avx2", "avx512"):
        if isa not in ext.available_isas():
            with pytest.raises(RuntimeError, match="does not support"):
                ext.packed_linear(x, *plan.op_args(), ISAS[isa], out)


def test_auto_is_table_lookup_and_exact_is_the_float_path(ext):
    plan = build_plan(random_packed("billm", 40, 200, 64))
    x = torch.randn(2, 200)

    def run(isa):
        out = torch.full((2, 40), float("nan"))
        ext.packed_linear(x, *plan.op_args(), ISAS[isa], out)
        return out

    fast, precise = ("avx2-lut", "avx2") if "avx2" in ext.available_isas() else ("scalar", "scalar")
    assert torch.equal(run("auto"), run(fast)) and torch.equal(run("exact"), run(precise))
    if fast != precise:
        assert not torch.equal(run("auto"), run("exact")), "the table path should round differently"


def test_table_lookup_turns_a_non_finite_activation_into_nan_outputs(ext):
    pw = random_packed("sign+mean", 20, 130, 130)
    x = torch.randn(1, 130)
    x[0, 70] = float("nan")
    out = torch.zeros(1, 20)
    ext.packed_linear(x, *build_plan(pw).op_args(), ISAS["auto"], out)
    assert torch.isnan(x.double() @ pw.decode(torch.float64).T).all() and torch.isnan(out).all()


def test_bad_arguments_are_refused_not_read_out_of_bounds(ext):
    plan = build_plan(random_packed("sign", 3, 64, 64))
    with pytest.raises(RuntimeError, match="x must be"):
        ext.packed_linear(torch.randn(1, 63), *plan.op_args(), 0, torch.empty(1, 3))
    with pytest.raises(RuntimeError, match="out must be"):
        ext.packed_linear(torch.randn(1, 64), *plan.op_args(), 0, torch.empty(1, 4))
    with pytest.raises(RuntimeError, match="tiles"):
        ext.packed_linear(torch.randn(1, 64), *replace(plan, tiles=plan.tiles[..., :64].contiguous()).op_args(),
                          0, torch.empty(1, 3))
    if "avx2-lut" in ext.available_isas():
        with pytest.raises(RuntimeError, match="needs the plan's tiles"):
            ext.packed_linear(torch.randn(1, 64), *replace(plan, tiles=plan.tiles[:0]).op_args(),
                              ISAS["avx2-lut"], torch.empty(1, 3))
    with pytest.raises(RuntimeError, match="row range"):
        ext.decode_rows(*plan.op_args(), 2, 5, torch.empty(3, 64), 0)


# PB-LLM's own layout (one group per row), where the salient part can stay in the checkpoint's
# streams: rows shorter than a 15-step escape (K = 5), rows without salient weights, K off words.
STREAM_SHAPES = [(1, 63), (7, 5), (50, 16), (17, 130), (40, 96), (9, 700)]


@pytest.mark.parametrize("isa", [i for i in CPU_ISAS if i != "avx2-lut"])
def test_the_salient_stream_form_matches_the_reference(ext, isa):
    for i, (N, K) in enumerate(STREAM_SHAPES):
        pw = random_packed("pb-llm", N, K, K, seed=i)
        plan = build_plan(pw, tiles=False, salient_stream=True)
        assert plan.salient_stream and plan.tiles.numel() == 0
        assert plan.sal_col.data_ptr() == pw.salient.positions.data_ptr()  # the checkpoint's stream, not a copy
        x = torch.randn(5, K, generator=torch.Generator().manual_seed(i))
        out = torch.full((5, N), float("nan"))
        ext.packed_linear(x, *plan.op_args(), ISAS[isa], out)
        assert_matches_reference(out, x, pw)
        rows = torch.full((N, plan.planes.shape[2] * 8), float("nan"))
        ext.decode_rows(*plan.op_args(), 0, N, rows, ISAS[isa])
        torch.testing.assert_close(rows[:, :K].double(), pw.decode(torch.float64), rtol=1e-6, atol=1e-6)


def test_a_stream_index_outside_the_streams_is_refused(ext):
    plan = build_plan(random_packed("pb-llm", 4, 64, 64), tiles=False, salient_stream=True)
    index = plan.sal_rowptr.clone()
    index[2, 0] = 10**9
    with pytest.raises(RuntimeError, match="outside the salient streams"):
        ext.packed_linear(torch.randn(1, 64), *replace(plan, sal_rowptr=index).op_args(), 0, torch.empty(1, 4))
