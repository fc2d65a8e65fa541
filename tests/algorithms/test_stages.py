"""The layer stages configured once on ``QuantConfig`` and applied by the pipeline around a method's
function (``algorithms.layer``): the scale refit stage gives exactly what each method's own
inline refit gave before it became a stage, for every method, basis and input dtype."""
from dataclasses import replace

import pytest
import torch

from llmbin.algorithms.hessian import damped_hessian, prepared_inverse
from llmbin.algorithms.incoherence import rotate_problem
from llmbin.algorithms.layer import quantize_layer
from llmbin.algorithms.metrics import hessian_weighted_error
from llmbin.algorithms.scales import refit_scales
from llmbin.config import BiLLMConfig, QuantConfig, available_methods, config_from_dict, make_config
from llmbin.errors import LlmbinError
from llmbin.packing.rotation import LayerRotation
from llmbin.registry import method_function

# (method, options) whose default or chosen setting has the refit on; ARB-X is billm with its recipe's options
REFITTED = [("pb-llm", {}), ("pb-llm", {"salient_frac": 0.5, "order_search": False}), ("db-llm", {}),
            ("db-llm", {"group_size": 32}), ("billm", {"blocksize": 32, "refine_iters": 15, "refit_scales": True}),
            ("arb-rc", {"blocksize": 32, "refit_scales": True})]


def _same(a, b) -> bool:
    ta, tb = a.tensors("l"), b.tensors("l")
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta) and a.metadata() == b.metadata()


def _inline(config, W, H):
    """What the methods computed before the refit was a stage: their fit, then ``refit_scales``
    against their prepared ``W`` (float32, dead inputs zeroed) and the damped ``H``."""
    packed = method_function(config)(W, H, config)
    W_prepared, _ = prepared_inverse(W.float(), H.float(), config.percdamp)
    return refit_scales(packed, W_prepared, damped_hessian(H.float(), config.percdamp))


def _with_dead_inputs(W, H):
    H = H.clone()
    H[:, [3, 50]] = 0
    H[[3, 50], :] = 0
    return W, H


@pytest.mark.parametrize("dead", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("method,options", REFITTED)
def test_the_refit_stage_equals_the_methods_inline_refit(method, options, dtype, dead, layer_problem):
    W, H = _with_dead_inputs(*layer_problem) if dead else layer_problem
    W = W.to(dtype)
    config = make_config(method, **options)
    assert config.wants_refit()
    assert _same(quantize_layer(method_function(config), W, H, config), _inline(config, W, H))


@pytest.mark.parametrize("method,options", [("db-llm", {}), ("pb-llm", {})])
def test_the_refit_stage_runs_in_the_rotated_basis(method, options, layer_problem):
    W, H = layer_problem
    config = make_config(method, **options)
    rotation = LayerRotation(11, 12)
    packed = quantize_layer(method_function(config), W, H, config, rotation)
    assert packed.rotation == rotation
    Wr, Hr = rotate_problem(W, H, rotation)
    assert _same(packed, replace(_inline(config, Wr, Hr), rotation=rotation))


@pytest.mark.parametrize("method,options", [("pb-llm", {}), ("db-llm", {}), ("billm", {"blocksize": 32}),
                                            ("gptq", {"bits": 2}), ("rtn-sign", {})])
def test_without_the_refit_the_pipeline_is_the_methods_function(method, options, layer_problem):
    W, H = layer_problem
    config = make_config(method, **{**options, "refit_scales": False})
    assert _same(quantize_layer(method_function(config), W, H, config), method_function(config)(W, H, config))


def test_each_method_keeps_its_own_default_for_the_refit():
    defaults = {m: make_config(m).refit_scales for m in available_methods()}
    assert defaults == {"pb-llm": True, "db-llm": True, "billm": False, "arb-rc": False, "gptq": False,
                        "rtn-sign": False}
    assert QuantConfig().refit_scales is False


def test_pbllm_with_every_weight_salient_has_no_scale_to_refit(layer_problem):
    W, H = layer_problem
    config = make_config("pb-llm", salient_frac=1.0, order_search=False)
    assert config.refit_scales and not config.wants_refit()
    assert _same(quantize_layer(method_function(config), W, H, config), method_function(config)(W, H, config))


@pytest.mark.parametrize("method,options", [("gptq", {"bits": 2}), ("gptq", {"bits": 3, "group_size": 32}),
                                            ("rtn-sign", {}), ("billm", {"blocksize": 32}),
                                            ("arb-rc", {"blocksize": 32})])
def test_every_layout_can_take_the_refit_stage_and_it_never_raises_the_error(method, options, layer_problem):
    """The refit re-solves any layout the format has (uniform grids' one step, column scales,
    classes), so no method refuses ``refit_scales: true``; it keeps the bits and lowers the error."""
    W, H = layer_problem
    plain, refit = (make_config(method, **options, refit_scales=r) for r in (False, True))
    before = quantize_layer(method_function(plain), W, H, plain)
    after = quantize_layer(method_function(refit), W, H, refit)
    assert torch.equal(after.planes, before.planes)
    assert hessian_weighted_error(W, after.decode(), H) < hessian_weighted_error(W, before.decode(), H)


def test_a_refit_option_of_the_wrong_type_is_refused_by_name():
    with pytest.raises(LlmbinError, match="option refit_scales must be true or false"):
        make_config("gptq", refit_scales="yes")


def test_records_written_before_the_stages_moved_still_read():
    # a GPTQ record from before refit_scales and the distillation were stages has neither key
    old = {"method": "gptq", "bits": 2, "group_size": 0, "percdamp": 0.01, "blocksize": 128, "rotate": "none",
           "rotate_seed": 0}
    config = config_from_dict(old)
    assert config == make_config("gptq") and not config.refit_scales and not config.distill
    dbllm = {"method": "db-llm", "group_size": 0, "refine_iters": 20, "refit_scales": True, "distill": True,
             "distill_epochs": 2, "distill_lr": 0.001, "percdamp": 0.01, "blocksize": 128, "rotate": "none",
             "rotate_seed": 0}
    assert config_from_dict(dbllm).to_dict() == dbllm
    assert isinstance(config_from_dict({"method": "arb-x"}), BiLLMConfig)


@pytest.mark.parametrize("rotation", [None, LayerRotation(11)])
def test_the_refit_damps_a_rotated_hessian_in_place_and_never_the_callers(rotation, layer_problem, monkeypatch):
    """The rotated H is the pipeline's own copy: the refit damps it in place (one K × K matrix
    fewer, 321 MB for Qwen2.5-1.5B's down_proj), while the caller's H, which other layers may
    share, is left exactly as it was."""
    import llmbin.algorithms.incoherence as incoherence
    import llmbin.algorithms.layer as layer

    W, H = layer_problem
    H_before, rotated, refitted = H.clone(), [], []
    real_rotate, real_refit = incoherence.rotate_problem, layer.refit_scales
    monkeypatch.setattr(layer, "rotate_problem", lambda *a: rotated.append(real_rotate(*a)) or rotated[-1])
    monkeypatch.setattr(layer, "refit_scales", lambda pw, W, H: refitted.append(H) or real_refit(pw, W, H))
    config = make_config("db-llm")
    quantize_layer(method_function(config), W, H, config, rotation)
    assert torch.equal(H, H_before)
    expected = rotated[0][1] if rotation is not None else None
    assert (refitted[0] is expected) == (rotation is not None) and refitted[0] is not H
