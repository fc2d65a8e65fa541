"""The fast decode path (static cache, compiled step) generates what the plain-torch reference does."""
import pytest
import torch

import llmbin
from llmbin.errors import LlmbinError
from llmbin.nn.binary_linear import BinaryLinear
from llmbin.nn.half_weights import HalfWeightLinear, serve_half_weights
from llmbin.nn.tree import set_submodule
from tests.conftest import tiny_model

# One layout per kind the format has, each from the method that writes it.
LAYOUTS = {
    "plain": ("rtn-sign", {}),
    "salient": ("pb-llm", {}),
    "fdb": ("db-llm", {}),
    "grouped": ("gptq", {"bits": 2, "group_size": 32}),
    "rotated": ("db-llm", {"planes": 1, "group_size": 32, "rotate": "both"}),
}
NEW_TOKENS = 64


def _bf16_exact(model):
    """Round the float weights to bf16 values, so the lm_head and embedding are served from 16 bits as a
    loaded checkpoint serves them (HalfWeightLinear), and the half_linear operator is in the graph too."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


@pytest.fixture(scope="module")
def mixed_model():
    """A tiny Llama whose 14 block linears cycle through every layout: each block mixes them."""
    calibration = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    sources = {kind: llmbin.quantize(_bf16_exact(tiny_model()), llmbin.make_config(method, **options), calibration,
                                     progress=False)
               for kind, (method, options) in LAYOUTS.items()}
    model = _bf16_exact(tiny_model())
    names = [name for name, m in sources["plain"].named_modules() if isinstance(m, BinaryLinear)]
    kinds = list(LAYOUTS)
    for i, name in enumerate(names):
        set_submodule(model, name, sources[kinds[i % len(kinds)]].get_submodule(name))
    assert serve_half_weights(model, torch.bfloat16) >= 1 and isinstance(model.lm_head, HalfWeightLinear)
    model.generation_config.eos_token_id = None  # all NEW_TOKENS tokens
    return model.eval()


def _generate(model, ids):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0)


def test_compiled_decode_generates_the_reference_tokens_for_every_layout(mixed_model, monkeypatch):
    layers = [m for m in mixed_model.modules() if isinstance(m, BinaryLinear)]
    assert {m.layout["planes"] for m in layers} >= {1, 2} and any("salient" in m.layout for m in layers)
    assert any(m.rotation is not None for m in layers)
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    monkeypatch.setenv("LLMBIN_KERNEL", "reference")  # plain torch: dense decode of every layer
    reference = _generate(mixed_model, ids)
    monkeypatch.setenv("LLMBIN_KERNEL", "exact")  # the packed kernels, exact in fp32
    torch._dynamo.reset()
    llmbin.prepare_decode(mixed_model, fullgraph=True)  # a graph break fails the test
    try:
        fast = _generate(mixed_model, ids)
    finally:
        mixed_model.generation_config.compile_config = None
        torch._dynamo.reset()
    assert mixed_model.generation_config.cache_implementation == "static"
    assert torch.equal(fast, reference)


def test_a_compiled_layer_without_its_plan_names_the_fix(monkeypatch):
    layer = BinaryLinear.from_float(torch.nn.Linear(64, 32))
    with torch.inference_mode():
        layer(torch.randn(200, 64))  # a long eager call builds only the light plan, which one-token steps must not run
    # What a trace sees (a real failing compile here would leave dynamo state behind for later tests)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(LlmbinError, match="call llmbin.prepare_decode"):
        layer.kernel_plan(1)
    monkeypatch.undo()
    layer.kernel_plan()  # an eager one-token call, or prepare_decode, builds the full plan
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert layer.kernel_plan(1) is layer._plan[1]  # once built, the trace reads the full plan


def test_prepare_decode_loads_the_cpu_kernels_only_for_a_model_on_the_cpu(monkeypatch):
    # loaded before the trace so the graph calls them directly; a GPU model must not build them
    import llmbin.nn.decode as decode

    loads = []
    monkeypatch.setattr(decode, "extension", lambda: loads.append(1))
    with torch.device("meta"):
        model = tiny_model()
    llmbin.prepare_decode(model, compile=False)
    assert loads == []
    llmbin.prepare_decode(tiny_model(), compile=False)
    assert loads == [1]


def test_prepare_decode_without_compile_keeps_eager_steps_with_a_static_cache():
    model = llmbin.prepare_decode(tiny_model(), compile=False)
    assert model.generation_config.cache_implementation == "static"
    assert model.generation_config.compile_config is None


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_one_token_attention_equals_transformers_sdpa(mask_kind):
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from llmbin.nn.decode import decode_sdpa

    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 6, 1, 16, generator=g), torch.randn(2, 2, 37, 16, generator=g),
                         torch.randn(2, 2, 37, 16, generator=g))
    mask = None
    if mask_kind != "none":
        allowed = torch.rand(2, 1, 1, 37, generator=g) > 0.3
        allowed[..., 0] = True
        mask = allowed if mask_kind == "bool" else torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    ours, _ = decode_sdpa(module, query, key, value, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (2, 1, 6, 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_decode_serves_quantized_tables_as_the_reference_does(bits, monkeypatch):
    from llmbin.nn.table_weights import TableEmbedding, TableLinear

    calibration = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    config = llmbin.make_config("rtn-sign", embedding_bits=bits, embedding_group_size=16)
    model = llmbin.quantize(tiny_model(), config, calibration, progress=False).eval()
    assert isinstance(model.lm_head, TableLinear) and isinstance(model.get_input_embeddings(), TableEmbedding)
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    monkeypatch.setenv("LLMBIN_KERNEL", "reference")  # the tables decoded in bands, torch's GEMM
    reference = _generate(model, ids)
    monkeypatch.setenv("LLMBIN_KERNEL", "exact")
    torch._dynamo.reset()
    llmbin.prepare_decode(model, fullgraph=True)  # the table operator stays in the graph
    try:
        fast = _generate(model, ids)
    finally:
        model.generation_config.compile_config = None
        torch._dynamo.reset()
    assert torch.equal(fast, reference)
