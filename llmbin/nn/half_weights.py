"""Float layers served from their 16-bit checkpoint weights at fp32 (see ``kernels.half``).

A packed checkpoint stores every tensor it does not binarize in 16 bits. Loaded at fp32, the
lm_head would be an fp32 copy: for SmolLM2-135M, 113 MB read per decoded token, as much as all
its binary layers together. These modules keep the 16-bit tensor and widen it exactly when
they compute, so outputs equal the fp32 model's up to summation order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.dispatch import kernel_path
from ..kernels.half import HALF_DTYPES, half_linear
from .tree import set_submodule


class HalfWeightLinear(nn.Linear):
    """``nn.Linear`` whose weight stays bf16/fp16 while activations are fp32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        self.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        needs_autograd = torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)  # the kernels have no backward
        if x.dtype != torch.float32 or w.dtype not in HALF_DTYPES or needs_autograd:
            return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        y = half_linear(x, w, use_kernel=kernel_path(x) is not None)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class HalfWeightEmbedding(nn.Embedding):
    """``nn.Embedding`` over a bf16/fp16 table (shared with a tied lm_head) that returns ``dtype``."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None, dtype: torch.dtype):
        super().__init__(weight.shape[0], weight.shape[1], padding_idx=padding_idx, _weight=weight, _freeze=True)
        self.out_dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.out_dtype)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() change the output dtype with the table; device moves do not
        self.out_dtype = fn(torch.empty(0, dtype=self.out_dtype)).dtype
        return super()._apply(fn, recurse)


def _narrow(weight: torch.Tensor, storage_dtype: torch.dtype) -> torch.Tensor | None:
    """``weight`` in ``storage_dtype`` if that holds it exactly (no copy if it already is), else None."""
    if weight.dtype == storage_dtype:
        return weight.detach()
    half = weight.detach().to(storage_dtype)
    return half if torch.equal(half.to(weight.dtype), weight) else None


@torch.no_grad()
def serve_half_weights(model: nn.Module, storage_dtype: torch.dtype) -> int:
    """Serve every plain ``nn.Linear`` and ``nn.Embedding`` of an fp32 model on the CPU from 16-bit
    weights: swapped for ``HalfWeightLinear`` / ``HalfWeightEmbedding`` (a tied pair shares one
    Parameter). A weight may already be in ``storage_dtype`` (a checkpoint just read) or be fp32
    holding such values (a quantized model rounded to them); one that would not narrow exactly
    stays fp32. Returns the number of modules swapped."""
    def half(name: str, module: nn.Module) -> torch.Tensor | None:
        ok = module.weight.is_cpu and module.weight.dtype in (torch.float32, storage_dtype)
        return _narrow(module.weight, storage_dtype) if ok else None

    return _swap_half(model, half)


def half_weight_skeleton(model: nn.Module, stored_half: set[str], storage_dtype: torch.dtype) -> int:
    """Before loading: give every plain ``nn.Linear`` / ``nn.Embedding`` of a meta skeleton whose
    weight is stored in ``storage_dtype`` (``stored_half``: state-dict names) its ``HalfWeight*``
    twin, empty on meta, so the 16-bit tensors load straight into it: an fp32 model never holds
    an fp32 copy of its embeddings, even for a moment."""
    def half(name: str, module: nn.Module) -> torch.Tensor | None:
        if module.weight.is_meta and f"{name}.weight" in stored_half:
            return torch.empty(module.weight.shape, dtype=storage_dtype, device="meta")
        return None

    return _swap_half(model, half)


def _swap_half(model: nn.Module, half_of) -> int:
    """Swap each plain linear / embedding for which ``half_of(name, module)`` gives a 16-bit weight."""
    swapped, served = 0, {}
    modules = list(model.named_modules())
    for name, module in modules:
        if type(module) is not nn.Linear:
            continue
        half = half_of(name, module)
        if half is None:
            continue
        bias = None if module.bias is None else (module.bias.detach() if module.bias.is_meta else module.bias.detach().float())
        layer = HalfWeightLinear(half, bias)
        served[id(module.weight)] = layer.weight
        set_submodule(model, name, layer)
        swapped += 1
    for name, module in modules:
        if type(module) is not nn.Embedding or module.max_norm is not None:
            continue
        shared = served.get(id(module.weight))
        half = shared if shared is not None else half_of(name, module)
        if half is None:
            if module.weight.is_cpu and module.weight.dtype != torch.float32:
                module.weight.data = module.weight.data.float()
            continue
        emb = HalfWeightEmbedding(half, module.padding_idx, torch.float32)
        if shared is not None:
            emb.weight = shared  # one Parameter, as the tie had
        set_submodule(model, name, emb)
        swapped += 1
    return swapped
