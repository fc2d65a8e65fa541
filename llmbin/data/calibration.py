"""Calibration windows: N seeded random windows of L tokens from one long tokenized text."""
from __future__ import annotations

import torch

from ..errors import LlmbinError
from .text import dataset_rows, resolve_text


def sample_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``(nsamples, seqlen)`` windows at seeded uniform random offsets (deterministic for a seed),
    GPTQ's convention: windows may overlap, but the text must hold ``nsamples × seqlen`` tokens.
    With less, most tokens would be counted several times while the run records ``nsamples``
    windows as if they were distinct, so less is refused rather than accepted with a warning."""
    if nsamples < 1 or seqlen < 1:
        raise LlmbinError(f"--nsamples and --seqlen must be positive, got {nsamples} and {seqlen}")
    total = token_ids.numel()
    if total < seqlen:
        raise LlmbinError(
            f"calibration text has {total} tokens, shorter than one window of {seqlen}; "
            "use more text or a smaller --seqlen"
        )
    if total < nsamples * seqlen:  # the windows would repeat text, which the Hessians then count several times
        raise LlmbinError(
            f"calibration text has {total} tokens, fewer than the {nsamples} x {seqlen} = {nsamples * seqlen} asked "
            f"(--nsamples x --seqlen); use more text, or at most --nsamples {total // seqlen}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([token_ids[s : s + seqlen] for s in starts.tolist()])


def sample_document_windows(tokenizer, documents: list[str], nsamples: int, seqlen: int, seed: int,
                            max_tries: int = 100_000) -> torch.Tensor:
    """One window per sample from a random document longer than ``seqlen`` tokens (the GPTQ
    convention for C4, whose train shard is far too large to tokenize whole)."""
    generator = torch.Generator().manual_seed(seed)
    windows = []
    for _ in range(max_tries):
        if len(windows) == nsamples:
            return torch.stack(windows)
        doc = documents[int(torch.randint(len(documents), (1,), generator=generator))]
        ids = tokenizer(doc, return_tensors="pt").input_ids[0]
        if ids.numel() > seqlen:
            start = int(torch.randint(ids.numel() - seqlen + 1, (1,), generator=generator))
            windows.append(ids[start : start + seqlen])
    raise LlmbinError(f"found only {len(windows)} documents longer than {seqlen} tokens; use a smaller --seqlen")


def calibration_windows(tokenizer, source: str, nsamples: int = 128, seqlen: int = 2048, seed: int = 0) -> torch.Tensor:
    if source == "c4":
        return sample_document_windows(tokenizer, dataset_rows("c4", "calibration"), nsamples, seqlen, seed)
    text = resolve_text(source, "calibration")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return sample_windows(ids, nsamples, seqlen, seed)
