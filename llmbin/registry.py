"""Method registry: config class -> ``(W, H, config) -> PackedWeight``.

Adding a method means adding a config class (``llmbin.config``, which also builds configs by name)
and one row here, nothing else. A variant that differs from a method only in its defaults is a
recipe (``recipes/``), not a row.
"""
from __future__ import annotations

from .algorithms.billm import arb_rc_quantize, billm_quantize
from .algorithms.dbllm import dbllm_quantize
from .algorithms.layer import MethodFn
from .algorithms.pbllm import pbllm_quantize
from .algorithms.rtn import rtn_sign_quantize
from .algorithms.uniform import gptq_quantize
from .config import ARBRCConfig, BiLLMConfig, DBLLMConfig, GPTQConfig, PBLLMConfig, QuantConfig, RTNSignConfig

FUNCTIONS: dict[type[QuantConfig], MethodFn] = {
    PBLLMConfig: pbllm_quantize,
    BiLLMConfig: billm_quantize,
    ARBRCConfig: arb_rc_quantize,
    DBLLMConfig: dbllm_quantize,
    GPTQConfig: gptq_quantize,
    RTNSignConfig: rtn_sign_quantize,
}


def method_function(config: QuantConfig) -> MethodFn:
    return FUNCTIONS[type(config)]
