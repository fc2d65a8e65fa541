import pytest
import torch

from llmbin.algorithms.gptq import gptq_reconstruct
from llmbin.algorithms.hessian import act_order, inverse_cholesky, permute_hessian, prepare_hessian
from llmbin.algorithms.layer import quantize_layer
from llmbin.algorithms.levels import compose, nearest_signs
from llmbin.algorithms.metrics import hessian_weighted_error
from llmbin.algorithms.pbllm import pbllm_quantize, salient_mask
from llmbin.algorithms.scales import refine_fit
from llmbin.config import PBLLMConfig, make_config
from llmbin.errors import LlmbinError


def _gptq_int8_error(W, H):
    W2, H2 = prepare_hessian(W, H, 0.01)
    scale = (W2.abs().amax(1) / 127).half().float()
    q = gptq_reconstruct(W2, inverse_cholesky(H2), lambda w, j: torch.clamp(torch.round(w / scale), -127, 127) * scale)
    return hessian_weighted_error(W, q, H)


def test_all_salient_matches_8bit_gptq(layer_problem):
    W, H = layer_problem
    packed = pbllm_quantize(W, H, PBLLMConfig(salient_frac=1.0, order_search=False))  # GPTQ's left-to-right order
    assert hessian_weighted_error(W, packed.decode(), H) == pytest.approx(_gptq_int8_error(W, H), rel=1e-4)


def test_no_salient_beats_plain_sign_binarization(layer_problem):
    W, H = layer_problem
    keep = torch.ones_like(W, dtype=torch.bool)  # the best plain μ ± α per row, no Hessian
    mu, alpha = refine_fit(W, keep, W.mean(1), (W - W.mean(1, keepdim=True)).abs().mean(1)[None], iters=20)
    rtn = hessian_weighted_error(W, compose(mu, alpha, nearest_signs(W, mu, alpha)), H)
    assert hessian_weighted_error(W, pbllm_quantize(W, H, PBLLMConfig(salient_frac=0.0)).decode(), H) < 0.95 * rtn


def test_error_falls_as_the_salient_fraction_grows(layer_problem):
    W, H = layer_problem
    errors = [hessian_weighted_error(W, pbllm_quantize(W, H, PBLLMConfig(salient_frac=f)).decode(), H)
              for f in (0.0, 0.1, 0.3)]
    assert errors[0] > errors[1] > errors[2]


def test_refit_of_scales_lowers_the_hessian_weighted_error(layer_problem):
    W, H = layer_problem
    plain = quantize_layer(pbllm_quantize, W, H, PBLLMConfig(refit_scales=False)).decode()
    refit = quantize_layer(pbllm_quantize, W, H, PBLLMConfig(refit_scales=True)).decode()
    assert hessian_weighted_error(W, refit, H) < hessian_weighted_error(W, plain, H)


@pytest.mark.parametrize("frac", [0.1, 0.5])
def test_scale_search_keeps_each_rows_best_pass(layer_problem, frac):
    # the plain α (γ = 1) is one of the passes, so no row gets worse; the stored scales are the ones
    # the chosen pass used, so the checkpoint's weight is that pass's Q (its error, recomputed from H)
    W, H = layer_problem
    W2, H2 = prepare_hessian(W, H, 0.01)
    def row_errors(config):
        E = W2.double() - pbllm_quantize(W, H, config).decode().double()
        return ((E @ H2.double()) * E).sum(dim=1)
    plain = row_errors(PBLLMConfig(salient_frac=frac, refit_scales=False, scale_search=0, order_search=False))
    searched = row_errors(PBLLMConfig(salient_frac=frac, refit_scales=False, scale_search=6, order_search=False))
    assert (searched <= plain * (1 + 1e-6)).all()
    assert searched.sum() < 0.99 * plain.sum()


@pytest.mark.parametrize("frac", [0.1, 0.5])
def test_order_search_keeps_the_order_with_less_error(layer_problem, frac):
    # the result is exactly one of the two single-order reconstructions (activation order done by
    # hand: permute, quantize, un-permute), the one with less error; the salient count is unchanged.
    # These inputs grow in scale left to right, so activation order (reversed) is the better one.
    W, H = layer_problem
    _, Hd = prepare_hessian(W, H, 0.01)
    config = PBLLMConfig(salient_frac=frac, refit_scales=False, order_search=False)
    natural = pbllm_quantize(W, H, config).decode()
    perm = act_order(H)
    by_hand = pbllm_quantize(W[:, perm], permute_hessian(H, perm), config).decode()[:, torch.argsort(perm)]
    searched = pbllm_quantize(W, H, PBLLMConfig(salient_frac=frac, refit_scales=False, order_search=True))
    errors = [hessian_weighted_error(W, Q, Hd) for Q in (natural, by_hand)]
    assert torch.equal(searched.decode(), by_hand)
    assert errors[1] < errors[0]
    assert searched.salient.count == round(frac * W.numel())


@pytest.mark.parametrize("metric", ["hessian", "magnitude"])
def test_salient_fraction_is_exact(layer_problem, metric):
    W, H = layer_problem
    packed = pbllm_quantize(W, H, PBLLMConfig(salient_frac=0.1, salient_metric=metric))
    assert packed.salient.count == round(0.1 * W.numel())


def test_magnitude_metric_keeps_the_largest_weights():
    W = torch.arange(20.0).reshape(4, 5) - 10
    mask = salient_mask(W, torch.eye(5), 0.2, "magnitude")
    assert torch.equal(torch.sort(W[mask].abs()).values, torch.tensor([8.0, 9.0, 9.0, 10.0]))


def test_hessian_metric_prefers_inputs_the_output_is_sensitive_to():
    W = torch.ones(4, 5)
    Hinv_upper = torch.diag(torch.tensor([1.0, 1.0, 0.1, 1.0, 1.0]))
    assert salient_mask(W, Hinv_upper, 0.2, "hessian")[:, 2].all()


@pytest.mark.parametrize("options,match", [
    ({"salient_frac": 1.5}, "salient-frac"),
    ({"salient_metric": "random"}, "salient-metric"),
    ({"percdamp": 0.0}, "percdamp"),
    ({"salient_bits": 9}, "salient_bits"),
    ({"scale_search": 17}, "scale_search"),
    ({"scale_search": -1}, "scale_search"),
    ({"group_size": 64}, "unknown option"),
])
def test_invalid_options_are_rejected(options, match):
    with pytest.raises(LlmbinError, match=match):
        make_config("pb-llm", **options)


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(LlmbinError, match="available: arb-rc, billm, db-llm, gptq, pb-llm, rtn-sign"):
        make_config("billm-xxl")
