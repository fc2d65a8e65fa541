"""Float layers served from their 16-bit checkpoint values: exact, tied, and saved unchanged."""
import pytest
import torch
from safetensors.torch import load_file

import llmbin
from llmbin.nn.half_weights import HalfWeightEmbedding, HalfWeightLinear, serve_half_weights
from tests.conftest import tiny_model

CALIB = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(0))
ONE_TOKEN = torch.tensor([[5]])  # decode: the lm_head runs the matrix-vector kernel


@pytest.fixture(scope="module", params=["llama", "mistral"])  # tied and untied embeddings
def quantized(request, tmp_path_factory):
    model = llmbin.quantize(tiny_model(request.param), llmbin.PBLLMConfig(), CALIB, progress=False)
    out = tmp_path_factory.mktemp("ckpt") / request.param
    llmbin.save(model, None, out)
    return request.param, model, out


def test_quantized_and_loaded_models_serve_the_lm_head_from_fp16(ext, quantized):
    kind, model, out = quantized
    for m in (model, llmbin.load(out)):
        assert type(m.lm_head) is HalfWeightLinear and m.lm_head.weight.dtype == torch.float16
        emb = m.get_input_embeddings()
        assert type(emb) is HalfWeightEmbedding and emb.weight.dtype == torch.float16
        if kind == "llama":  # the tie survives: one fp16 Parameter for both
            assert emb.weight is m.lm_head.weight
        else:  # an untied embedding is served from fp16 too (for a 7B model that halves 0.5 GB)
            assert emb.weight is not m.lm_head.weight
            with torch.no_grad():
                assert emb(ONE_TOKEN).dtype == torch.float32


def test_decode_logits_equal_the_fp32_product_and_survive_save_and_load(ext, quantized):
    _, model, out = quantized
    loaded = llmbin.load(out)
    with torch.no_grad():
        hidden = model.model(ONE_TOKEN).last_hidden_state
        logits = model(ONE_TOKEN).logits
        assert logits.dtype == torch.float32
        assert torch.equal(loaded(ONE_TOKEN).logits, logits)
        exact = hidden.double() @ model.lm_head.weight.double().T
        torch.testing.assert_close(logits.double(), exact, rtol=1e-5, atol=1e-5)


def test_a_loaded_model_saves_the_checkpoint_it_came_from(ext, quantized, tmp_path):
    _, _, out = quantized
    llmbin.save(llmbin.load(out), None, tmp_path / "again")
    first, again = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) and first[k].dtype == again[k].dtype for k in first)


def test_casting_the_model_casts_the_embedding_output(ext, quantized):
    kind, _, out = quantized
    model = llmbin.load(out).to(torch.bfloat16)
    with torch.no_grad():
        assert model.get_input_embeddings()(ONE_TOKEN).dtype == torch.bfloat16
        assert model.lm_head(torch.randn(1, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_a_weight_that_fp16_would_round_is_left_in_fp32():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2), torch.nn.Embedding(5, 3),
                                torch.nn.Embedding(5, 3))
    with torch.no_grad():
        model[1].weight.copy_(model[1].weight.half().float())  # exactly fp16; model[0] is not
        model[3].weight.copy_(model[3].weight.half().float())
    assert serve_half_weights(model, torch.float16) == 2
    assert type(model[0]) is torch.nn.Linear and type(model[1]) is HalfWeightLinear
    assert type(model[2]) is torch.nn.Embedding and type(model[3]) is HalfWeightEmbedding


@pytest.mark.parametrize("batch", [1, 64])  # the C++ matrix-vector kernel, then bands + GEMM
def test_inputs_that_require_grad_get_gradients(ext, batch):
    weight = torch.randn(5, 16).half()
    x = torch.randn(batch, 16, requires_grad=True)
    HalfWeightLinear(weight)(x).sum().backward()
    torch.testing.assert_close(x.grad, weight.float().sum(0).expand(batch, 16))
