"""One rule for dtype "auto", the same for quantize, eval and from_pretrained (each as it was before)."""
import pytest
import torch

from llmbin.dtypes import auto_dtype

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("on_cpu,stored,expected", [
    (True, bf16, fp32), (True, fp16, fp32), (True, None, fp32),
    (False, bf16, bf16), (False, fp16, fp16), (False, fp32, fp32), (False, None, fp32),
])
def test_the_rule(on_cpu, stored, expected):
    assert auto_dtype(on_cpu, stored) == expected


def test_quantize_uses_the_source_models_stored_dtype():
    from llmbin.models import compute_dtype

    assert compute_dtype("auto", "cpu", bf16) == fp32 and compute_dtype("auto", "cuda:1", bf16) == bf16
    assert compute_dtype("auto", "meta", fp16) == fp16  # anything but the CPU is an accelerator, as before


@pytest.mark.parametrize("name,device,expected", [
    ("auto", "cpu", fp32), ("auto", "cuda", fp16), ("auto", "cuda:1", fp16),
    ("bfloat16", "cpu", bf16), ("float16", "cpu", fp16), ("float32", "cuda", fp32),
])
def test_eval_uses_the_checkpoints_float16_as_the_stored_dtype(name, device, expected):
    from llmbin.cli import _eval_dtype

    assert _eval_dtype(name, device) == expected


@pytest.mark.parametrize("host_only,asked,expected", [
    (True, fp16, fp32), (True, bf16, bf16), (True, fp32, fp32),  # fp16 is what "auto" reads from config.json
    (False, fp16, fp16), (False, bf16, bf16), (False, fp32, fp32),
])
def test_from_pretrained_applies_the_rule_to_the_stored_float16(host_only, asked, expected):
    from llmbin.checkpoint.hf_quantizer import LlmbinConfig, LlmbinHfQuantizer

    quantizer = LlmbinHfQuantizer(LlmbinConfig(), pre_quantized=True)
    quantizer._host_only = host_only
    assert quantizer.update_dtype(asked) == expected
