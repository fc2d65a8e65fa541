"""Every registered method on one layer problem: format round trip, exact bookkeeping between
the GPTQ loop and the packed bits, error below round-to-nearest, and honest bit counts."""
import pytest
import torch

import llmbin.algorithms.billm as billm_module
import llmbin.algorithms.grouped as grouped_module
from llmbin.algorithms.layer import quantize_layer
from llmbin.algorithms.metrics import hessian_weighted_error
from llmbin.config import available_methods, make_config
from llmbin.packing.packed_weight import PackedWeight
from llmbin.registry import method_function

ARB_X = {"refine_iters": 15, "refit_scales": True}  # recipes/arb-x.yaml: BiLLM with ARB's refinement and the refit
SETTINGS = [("rtn-sign", {}), ("gptq", {"bits": 2}), ("gptq", {"bits": 3, "group_size": 32}),
            ("gptq", {"bits": 4}), ("db-llm", {}), ("db-llm", {"group_size": 32, "refit_scales": False}),
            ("db-llm", {"planes": 1, "group_size": 32}), ("billm", {"blocksize": 32}),
            ("billm", {**ARB_X, "blocksize": 32}), ("arb-rc", {"blocksize": 32}), ("pb-llm", {})]


def _run(method, options, W, H):
    """The method's function with the layer stages its config asks for (the scale refit), as the driver runs it."""
    config = make_config(method, **options)
    return quantize_layer(method_function(config), W, H, config)


def _error(method, options, W, H):
    return hessian_weighted_error(W, _run(method, options, W, H).decode(), H)


def test_every_registered_method_is_covered():
    assert {m for m, _ in SETTINGS} == set(available_methods())


@pytest.mark.parametrize("method,options", SETTINGS)
def test_format_round_trip_is_exact(method, options, layer_problem):
    W, H = layer_problem
    packed = _run(method, options, W, H)
    back = PackedWeight.from_tensors(packed.tensors("l"), "l", packed.metadata())
    assert torch.equal(back.decode(), packed.decode())
    assert back.storage_bits() == packed.storage_bits()


@pytest.mark.parametrize("method,options", [s for s in SETTINGS if s[0] not in ("rtn-sign", "pb-llm")])
def test_error_is_below_round_to_nearest_sign_binarization(method, options, layer_problem):
    W, H = layer_problem
    assert _error(method, options, W, H) < 0.8 * _error("rtn-sign", {}, W, H)


@pytest.mark.parametrize("module,method,options", [
    (billm_module, "billm", {"blocksize": 32}), (billm_module, "arb-rc", {"blocksize": 32, "refit_scales": False}),
    (grouped_module, "gptq", {"bits": 3, "group_size": 32}), (grouped_module, "db-llm", {"refit_scales": False}),
    (grouped_module, "db-llm", {"planes": 1, "group_size": 32, "refit_scales": False})])
def test_packed_bits_decode_to_exactly_what_the_gptq_loop_chose(module, method, options, layer_problem, monkeypatch):
    W, H = layer_problem
    seen = {}
    original = module.gptq_reconstruct
    monkeypatch.setattr(module, "gptq_reconstruct", lambda *a, **k: seen.setdefault("Q", original(*a, **k)))
    packed = _run(method, options, W, H)
    assert torch.allclose(packed.decode(), seen["Q"], rtol=0, atol=1e-6)


def test_more_bits_and_groups_lower_the_gptq_error(layer_problem):
    W, H = layer_problem
    e2, e3, e4 = (_error("gptq", {"bits": b}, W, H) for b in (2, 3, 4))
    assert e2 > e3 > e4
    assert _error("gptq", {"bits": 2, "group_size": 32}, W, H) < e2


def test_dual_binarization_beats_the_2bit_uniform_grid(layer_problem):
    W, H = layer_problem
    assert _error("db-llm", {}, W, H) < 0.9 * _error("gptq", {"bits": 2}, W, H)


def test_binary_planes_trade_bits_for_error(layer_problem):
    """One plane with group scales lies between the per-row sign code and two planes, in bits and in error."""
    W, H = layer_problem
    one_row, one_grouped, two = (_error("db-llm", o, W, H) for o in ({"planes": 1}, {"planes": 1, "group_size": 32}, {}))
    assert two < one_grouped < one_row
    assert one_row < 0.9 * _error("rtn-sign", {}, W, H)  # the free offset, ALS and error feedback pay


def test_arb_refinement_improves_on_billm(layer_problem):
    W, H = layer_problem
    billm = _error("billm", {"blocksize": 32}, W, H)
    assert _error("billm", {**ARB_X, "blocksize": 32}, W, H) < billm
    assert _error("billm", {**ARB_X, "blocksize": 32, "refit_scales": False}, W, H) < billm


def test_bits_per_weight_count_every_scale_and_mask(layer_problem):
    W, H = layer_problem
    N, K = W.shape  # 40 x 96: rows pad to 128 bits
    bits = lambda m, o: _run(m, o, W, H).storage_bits()  # noqa: E731
    assert bits("rtn-sign", {}) == N * 128 + N * 16
    assert bits("gptq", {"bits": 2}) == 2 * N * 128 + 2 * N * 16  # planes + one step + one mean per row
    assert bits("gptq", {"bits": 2, "group_size": 32}) == 2 * N * 128 + 2 * N * 3 * 16
    assert bits("db-llm", {}) == 2 * N * 128 + 3 * N * 16
    assert bits("db-llm", {"planes": 1, "group_size": 32}) == N * 128 + 2 * N * 3 * 16  # one α and one μ per group
    # two planes, 4 scales + 3 means per row and block, the salient-column mask (padded to 64 bits)
    assert bits("billm", {"blocksize": 32}) == 2 * N * 128 + 7 * N * 3 * 16 + 128
    # ARB-RC: no means; column scales per term
    assert bits("arb-rc", {"blocksize": 32}) == 2 * N * 128 + 4 * N * 3 * 16 + 128 + 4 * K * 16


def test_salient_columns_are_structured_and_the_class_plane_is_used(layer_problem):
    W, H = layer_problem
    packed = _run("billm", {"blocksize": 32}, W, H)
    cls = packed.classes()
    salient_cols = (cls == 2).all(dim=0)
    assert torch.equal((cls == 2).any(dim=0), salient_cols)  # whole columns
    assert 1 <= int(salient_cols.sum()) <= 3 * 30
    ordinary = cls[:, ~salient_cols]
    assert (ordinary == 0).any() and (ordinary == 1).any()  # the break-point split is used
