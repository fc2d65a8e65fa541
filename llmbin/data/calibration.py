"""Calibration windows: N seeded random windows of L tokens from one long tokenized text."""
from __future__ import annotations

import torch

from ..errors import LlmbinError
from .text import resolve_text


def sample_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``(nsamples, seqlen)`` windows at seeded uniform random offsets (deterministic for a seed)."""
    if nsamples < 1 or seqlen < 1:
        raise LlmbinError(f"--nsamples and --seqlen must be positive, got {nsamples} and {seqlen}")
    total = token_ids.numel()
    if total < seqlen:
        raise LlmbinError(
            f"calibration text has {total} tokens, shorter than one window of {seqlen}; "
            "use more text or a smaller --seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([token_ids[s : s + seqlen] for s in starts.tolist()])


def calibration_windows(tokenizer, source: str, nsamples: int = 128, seqlen: int = 2048, seed: int = 0) -> torch.Tensor:
    text = resolve_text(source, "calibration")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return sample_windows(ids, nsamples, seqlen, seed)
