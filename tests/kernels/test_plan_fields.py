"""The kernel plan's fields are listed once per language: ``KernelPlan`` in Python, one macro list
in the C++ source. The operator's schema, its fake, and the C++ entry points all take the plan as
``op_args()``'s two lists, and a build whose list differs from ``KernelPlan``'s is refused."""
import dataclasses
import re
import types

import pytest
import torch

from llmbin.kernels import cpu
from llmbin.kernels.plan import PLAN_INTS, PLAN_TENSORS, KernelPlan, build_plan
from tests.kernels.conftest import random_packed


def source_fields() -> tuple[list[str], list[str]]:
    """The two field lists as the C++ source spells them (``LLMBIN_PLAN_TENSORS``, ``LLMBIN_PLAN_INTS``)."""
    text = cpu.SOURCES[0].read_text()
    lists = []
    for macro in ("LLMBIN_PLAN_TENSORS", "LLMBIN_PLAN_INTS"):
        body = re.search(rf"#define {macro}\(X\)((?:[^\n]*\\\n)*[^\n]*)", text).group(1)
        lists.append(re.findall(r"X\((\w+)\)", body))
    return lists[0], lists[1]


def test_the_plan_fields_are_the_dataclass_fields_in_order():
    names = [f.name for f in dataclasses.fields(KernelPlan)]
    assert sorted(PLAN_TENSORS + PLAN_INTS) == sorted(names)
    assert list(PLAN_TENSORS) == [n for n in names if n in PLAN_TENSORS]
    assert list(PLAN_INTS) == [n for n in names if n in PLAN_INTS]
    plan = build_plan(random_packed("pb-llm", 5, 70, 70))
    tensors, ints = plan.op_args()
    assert all(isinstance(t, torch.Tensor) for t in tensors) and all(type(i) is int for i in ints)
    assert [t is getattr(plan, n) for n, t in zip(PLAN_TENSORS, tensors)] == [True] * len(PLAN_TENSORS)
    assert list(ints) == [getattr(plan, n) for n in PLAN_INTS]
    again = KernelPlan.from_op_args(tensors, ints)
    assert all(getattr(again, n) is getattr(plan, n) for n in PLAN_TENSORS) and again.shape == plan.shape == (5, 70)
    with pytest.raises(ValueError):  # a list of the wrong length is an error, not a silently shifted plan
        KernelPlan.from_op_args(tensors[:-1], ints)


def test_the_cpp_source_lists_the_same_fields():
    # read from the source, so this holds without a compiler as well
    assert source_fields() == (list(PLAN_TENSORS), list(PLAN_INTS))


def test_the_built_extension_exports_the_same_fields(ext):
    assert tuple(ext.plan_fields()) == (list(PLAN_TENSORS), list(PLAN_INTS))


def test_the_operator_takes_the_plan_as_its_two_lists():
    schema = torch.ops.llmbin.packed_linear.default._schema
    assert [(a.name, str(a.type)) for a in schema.arguments] == [
        ("x", "Tensor"), ("plan_tensors", "List[Tensor]"), ("plan_ints", "List[int]"), ("isa", "int")]
    plan = build_plan(random_packed("billm", 6, 130, 64))
    x = torch.randn(3, 130)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:  # the fake reads the plan's sizes through the same two lists
        fake = torch.ops.llmbin.packed_linear(mode.from_tensor(x), *[[mode.from_tensor(t) for t in plan.op_args()[0]],
                                                                      list(plan.op_args()[1])])
    assert fake.shape == (3, 6) and fake.dtype == torch.float32


@pytest.mark.parametrize("drift", ["order", "missing", "renamed"])
def test_a_build_whose_field_list_drifted_is_refused(drift):
    tensors, ints = list(PLAN_TENSORS), list(PLAN_INTS)
    if drift == "order":
        tensors[0], tensors[1] = tensors[1], tensors[0]
    elif drift == "missing":
        ints = ints[:-1]
    else:
        tensors[-1] = "salient_rows"
    drifted = types.SimpleNamespace(plan_fields=lambda: (tensors, ints))
    with pytest.raises(RuntimeError, match="must be the same, in the same order"):
        cpu.check_plan_fields(drifted)
    cpu.check_plan_fields(types.SimpleNamespace(plan_fields=lambda: (list(PLAN_TENSORS), list(PLAN_INTS))))


def test_the_cpp_entry_points_refuse_lists_of_the_wrong_shape(ext):
    plan = build_plan(random_packed("sign", 3, 64, 64))
    tensors, ints = plan.op_args()
    x, out = torch.randn(1, 64), torch.empty(1, 3)
    with pytest.raises(RuntimeError, match="a plan is 10 tensors and 4 integers"):
        ext.packed_linear(x, tensors[:-1], ints, 0, out)
    with pytest.raises(RuntimeError, match="a plan is 10 tensors and 4 integers"):
        ext.decode_rows(tensors, ints + (1,), 0, 3, torch.empty(3, 64), 0)
    with pytest.raises(RuntimeError, match="is not a tensor"):
        ext.linear(x, (1,) + tensors[1:], ints, 0)
    with pytest.raises(RuntimeError, match="tuple or list"):
        ext.linear(x, iter(tensors), ints, 0)
    with pytest.raises(RuntimeError, match="out_features and in_features do not match"):
        ext.packed_linear(x, tensors, (4,) + ints[1:], 0, out)
    torch.testing.assert_close(ext.linear(x, list(tensors), list(ints), 0), ext.linear(x, tensors, ints, 0),
                               rtol=0, atol=0)  # lists (as the operator passes them) and tuples alike
