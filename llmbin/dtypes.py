"""The one rule for ``dtype="auto"``, used by ``llmbin quantize`` (``models.compute_dtype``),
``llmbin eval`` and ``from_pretrained`` of a packed checkpoint (``checkpoint.hf_quantizer``)."""
from __future__ import annotations

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)


def auto_dtype(on_cpu: bool, stored: torch.dtype | None) -> torch.dtype:
    """float32 on the CPU: CPUs have no fast 16-bit matmul, and llmbin's CPU kernels compute in
    float32. On an accelerator, the model's stored 16-bit dtype; float32 for a model stored in
    float32, or whose stored dtype is not known. Callers pass what "stored" means for them: the
    source model's shards when quantizing, a packed checkpoint's float16 when loading one."""
    if on_cpu or stored not in HALF_DTYPES:
        return torch.float32
    return stored
