"""Fast decode through ``model.generate``: a static KV cache and a compiled decode step.

Eager decode of a packed model spends as much time in the transformers model's Python (norms,
attention, rotary, residual adds: dozens of small dispatches per block) as in its packed layers.
Compiling the one-token step removes that: inductor fuses the elementwise work, and the packed
and 16-bit layers stay in the graph as ``llmbin::packed_linear`` / ``llmbin::half_linear``
operators (both have fake implementations). transformers compiles the decode step itself when
the cache is static and ``generation_config.compile_config`` allows the device; this module sets
both, and builds every packed layer's kernel plan first, since a traced graph can only read one.

    model = llmbin.load("ckpt")            # or AutoModelForCausalLM.from_pretrained
    llmbin.prepare_decode(model)           # then model.generate(...) as usual

The first ``generate`` call compiles (tens of seconds to minutes); later calls with the same
``max_new_tokens`` + prompt length bucket reuse it. ``compile=False`` keeps the static cache only.
"""
from __future__ import annotations

from torch import nn
from transformers import CompileConfig

from .binary_linear import BinaryLinear


def prepare_decode(model: nn.Module, compile: bool = True, fullgraph: bool = False) -> nn.Module:
    """Set ``model`` up for fast ``generate``: kernel plans built, static cache, compiled decode step
    (``compile``; ``fullgraph=True`` makes a graph break an error rather than a slow path). Returns it."""
    for module in model.modules():
        if isinstance(module, BinaryLinear):
            module.kernel_plan()  # the full plan (table-lookup tiles, salient lists): what one-token steps run
    config = model.generation_config
    config.cache_implementation = "static"
    if compile:
        compile_config = CompileConfig(fullgraph=fullgraph, dynamic=False, mode="default")
        # transformers compiles on accelerators only unless told; the CPU path is what llmbin serves
        compile_config._compile_all_devices = True
        config.compile_config = compile_config
    else:
        config.compile_config = None
        config.disable_compile = True
    return model

