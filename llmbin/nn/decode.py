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

import itertools

import torch
from torch import nn
from transformers import AttentionInterface, CompileConfig
from transformers.integrations.sdpa_attention import pack_gqa, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..kernels.cpu import extension
from .binary_linear import BinaryLinear

DECODE_ATTENTION = "llmbin_sdpa"


def decode_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' ``sdpa`` attention, except that a one-token step of a grouped-query model
    attends on the key/value heads directly, its query heads packed per key/value head
    (``pack_gqa``), compiled or not. transformers does that in eager steps only; compiled, it
    copies the whole static cache once per query head in every step (``repeat_kv``): for SmolLM2
    (9 query heads, 3 key/value heads, 640 positions), 90 MB written per token."""
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or dropout or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    # Two small matrix products and a softmax, which inductor fuses: the CPU flash kernel costs
    # about 180 us a call at this size (three heads of three queries), mostly its own overhead.
    q = pack_gqa(query, groups)
    scores = torch.matmul(q, key.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype), value)
    return out.reshape(out.shape[0], -1, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _skip_plan_tensor_guards(entries) -> list[bool]:
    """Keep every guard but the per-tensor checks on kernel plans' fields (thousands of tensors:
    about 2 ms a step for SmolLM2). A plan is immutable and replaced whole when its layer moves,
    and the layer's own buffers and the plan's integers stay guarded."""
    return [not (entry.guard_type == "TENSOR_MATCH" and "_plan" in entry.name) for entry in entries]


def prepare_decode(model: nn.Module, compile: bool = True, fullgraph: bool = False) -> nn.Module:
    """Set ``model`` up for fast ``generate``: kernel plans built, static cache, compiled decode step
    (``compile``; ``fullgraph=True`` makes a graph break an error rather than a slow path). Returns it."""
    if any(t.is_cpu for t in itertools.chain(model.parameters(), model.buffers())):
        extension()  # loaded before any trace, so the graph calls the C++ kernels directly (kernels.cpu_ops_ready)
    for module in model.modules():
        if isinstance(module, BinaryLinear):
            module.kernel_plan()  # the full plan (table-lookup tiles, salient lists): what one-token steps run
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        AttentionInterface.register(DECODE_ATTENTION, decode_sdpa)
        AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
        model.set_attn_implementation(DECODE_ATTENTION)
    config = model.generation_config
    config.cache_implementation = "static"
    if compile:
        compile_config = CompileConfig(fullgraph=fullgraph, dynamic=False, mode=None,
                                       options={"guard_filter_fn": _skip_plan_tensor_guards, "size_asserts": False,
                                                "alignment_asserts": False})
        # transformers compiles on accelerators only unless told; the CPU path is what llmbin serves
        compile_config._compile_all_devices = True
        config.compile_config = compile_config
    else:
        config.compile_config = None
        config.disable_compile = True
    return model

