"""Every tensor the methods create lands on the device of the data they work on.

CI has no GPU, so a tensor created without an explicit device (which on a GPU run would land
on the CPU next to a CUDA ``W``) is caught here by making the *default* device ``meta``: the
inputs are real CPU tensors, so any stray factory call yields a meta tensor, and mixing it
with them fails (or leaves meta tensors in the result, which the checks below catch)."""
import pytest
import torch

from llmbin.algorithms.layer import quantize_layer
from llmbin.config import make_config
from llmbin.packing.packed_weight import PackedWeight
from llmbin.registry import method_function
from tests.algorithms.test_methods import SETTINGS


def _real(tensors) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


@pytest.mark.parametrize("method,options", SETTINGS)
def test_every_method_runs_with_meta_as_the_default_device(method, options, layer_problem):
    W, H = layer_problem
    config = make_config(method, **options)
    expected = quantize_layer(method_function(config), W, H, config)  # the method and its layer stages
    with torch.device("meta"):
        packed = quantize_layer(method_function(config), W, H, config)
    assert _real(packed.named_tensors().values())
    assert torch.equal(packed.decode(), expected.decode())


def test_refit_and_kernel_plan_run_with_meta_as_the_default_device(layer_problem):
    from llmbin.algorithms.scales import refit_scales
    from llmbin.kernels.plan import build_plan, plan_decode

    W, H = layer_problem
    config = make_config("db-llm", refit_scales=False)
    packed = method_function(config)(W, H, config)
    expected = refit_scales(packed, W, H)
    with torch.device("meta"):
        got = refit_scales(packed, W, H)
        plan = build_plan(PackedWeight.from_tensors(got.tensors("l"), "l", got.metadata()))
    assert torch.equal(got.decode(), expected.decode())
    assert torch.allclose(plan_decode(plan), got.decode(), atol=1e-6)
