"""``torch.ops.llmbin_cpu``: the C++ kernels as dispatcher operators, which a compiled graph calls
with no Python in between. Traced small batches use them and give what eager calls give, bit for
bit; without the extension loaded, or past the small-batch sizes, a trace keeps ``torch.ops.llmbin``."""
import pytest
import torch

import llmbin.kernels.ops as ops
import llmbin.kernels.rotate as rotate_module
import llmbin.kernels.table as table_module
from llmbin.kernels.ops import packed_linear
from llmbin.kernels.plan import build_plan
from llmbin.kernels.rotate import rotate
from llmbin.kernels.table import table_linear
from llmbin.packing.rotation import OrthogonalTransform
from llmbin.packing.table import QuantTable
from tests.kernels.conftest import random_packed


def _traced(fn, x):
    """``fn(x)`` compiled whole, and the operators its graph calls."""
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=backend)(x)
    ops_called = {str(node.target).removesuffix(".default") for gm in graphs for node in gm.graph.nodes
                  if node.op == "call_function" and str(node.target).startswith("llmbin")}
    return out, ops_called


@pytest.mark.parametrize("layout", ["sign+mean", "pb-llm", "dual (db-llm)", "arb-rc"])
def test_traced_small_batches_call_the_cpu_operator_and_match_eager(ext, layout):
    plan = build_plan(random_packed(layout, 37, 200, 64))
    for shape in [(1, 200), (2, 3, 200)]:  # leading dimensions go to C++ as they are
        x = torch.randn(*shape)
        out, called = _traced(lambda v: packed_linear(v, plan), x)
        assert called == {"llmbin_cpu.linear"}
        assert torch.equal(out, packed_linear(x, plan))
    x = torch.randn(256, 200)  # past the small-batch work: bands + GEMM, through the Python operator
    assert _traced(lambda v: packed_linear(v, plan), x)[1] == {"llmbin.packed_linear"}


@pytest.mark.parametrize("n", [7, 96, 1536, 8960])
def test_traced_rotations_call_the_cpu_operator_and_match_eager(ext, n):
    T = OrthogonalTransform(n, seed=2)
    x = torch.randn(2, n)
    for transpose in (False, True):
        out, called = _traced(lambda v: rotate(v, T, transpose=transpose), x)
        assert called == {"llmbin_cpu.rotate"}
        assert torch.equal(out, rotate(x, T, transpose=transpose))


@pytest.mark.parametrize("bits", [8, 4])
def test_traced_tables_call_the_cpu_operator_and_match_eager(ext, bits):
    table = QuantTable.quantize(torch.randn(130, 100), bits, 32)
    x = torch.randn(1, 2, 100)
    out, called = _traced(lambda v: table_linear(v, table), x)
    assert called == {"llmbin_cpu.table_linear"}
    assert torch.equal(out, table_linear(x, table))


def test_each_operator_passes_opcheck(ext):
    plan = build_plan(random_packed("pb-llm", 6, 130, 64))
    torch.library.opcheck(torch.ops.llmbin_cpu.linear.default, (torch.randn(3, 130), *plan.op_args(), 0))
    T = OrthogonalTransform(96, seed=1)
    odd = T.factors[-1]
    torch.library.opcheck(torch.ops.llmbin_cpu.rotate.default, (torch.randn(2, 96), T.signs, 96 // odd.shape[0], odd,
                                                                 True))
    table = QuantTable.quantize(torch.randn(9, 40), 8, 8)
    torch.library.opcheck(torch.ops.llmbin_cpu.table_linear.default,
                          (torch.randn(2, 40), table.codes, table.scale, 8, 8))


def test_without_the_extension_loaded_a_trace_keeps_the_python_operators(ext, monkeypatch):
    # a trace never builds the extension: before it is loaded, the graph calls torch.ops.llmbin
    for module in (ops, rotate_module, table_module):
        monkeypatch.setattr(module, "cpu_ops_ready", lambda: False)
    plan = build_plan(random_packed("sign+mean", 5, 64, 64))
    T, table = OrthogonalTransform(64, seed=1), QuantTable.quantize(torch.randn(5, 64), 8, 32)
    out, called = _traced(lambda v: table_linear(packed_linear(rotate(v, T), plan).repeat(1, 13)[:, :64], table),
                          torch.randn(1, 64))
    assert called == {"llmbin.rotate", "llmbin.packed_linear", "llmbin.table_linear"}
