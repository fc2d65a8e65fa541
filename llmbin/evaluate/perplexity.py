"""Perplexity by the papers' protocol: one tokenized text, non-overlapping windows, exp(mean NLL)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import LlmbinError, check_positions, check_token_ids


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
               progress: bool = True) -> float:
    """``exp`` of the mean next-token NLL over ``numel // seqlen`` non-overlapping windows."""
    windows = token_ids.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise LlmbinError(f"evaluation text has {token_ids.numel()} tokens, fewer than one window of {seqlen}; lower --seqlen")
    check_positions(model.config, seqlen)
    check_token_ids(model, token_ids)
    weight = model.get_input_embeddings().weight
    device = weight.device if not weight.is_meta else "cpu"  # a dispatched model's hooks move inputs
    total = 0.0
    for i in tqdm(range(windows), desc="perplexity", unit="window", disable=not progress):
        ids = token_ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, ids[0, 1:], reduction="mean").item()
    if not math.isfinite(total):
        raise LlmbinError("the model's outputs are NaN or infinite, so its perplexity is undefined; the model or "
                          "checkpoint is broken (check its weights for NaN), re-create it")
    return math.exp(total / windows)


def dataset_perplexity(model, tokenizer, dataset: str, *, eval_data: str | None = None, seqlen: int = 2048,
                       max_windows: int | None = None, progress: bool = True) -> float:
    """:func:`perplexity` of a data set's test text: ``dataset`` is wikitext2, c4, ptb or a text
    file; ``eval_data``, a local file holding that data set's text, is read instead if given."""
    from ..data.text import resolve_text

    ids = tokenizer(resolve_text(eval_data or dataset, "test"), return_tensors="pt").input_ids[0]
    return perplexity(model, ids, seqlen, max_windows, progress=progress)
