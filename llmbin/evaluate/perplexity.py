"""Perplexity by the papers' protocol: one tokenized text, non-overlapping windows, exp(mean NLL)."""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import LlmbinError, check_positions, check_token_ids
from .window_log import WindowLog, token_digest


def ppl_of(nlls: list[float]) -> float:
    """``exp`` of the mean of per-window mean NLLs (equal-length windows: the mean over tokens)."""
    total = sum(nlls)
    if not math.isfinite(total):
        raise LlmbinError("the model's outputs are NaN or infinite, so its perplexity is undefined; the model or "
                          "checkpoint is broken (check its weights for NaN), re-create it")
    return math.exp(total / len(nlls))


@torch.no_grad()
def window_nlls(model, token_ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
                progress: bool = True, log: str | os.PathLike | None = None, model_name: str = "") -> list[float]:
    """Mean next-token NLL of each of the ``numel // seqlen`` non-overlapping windows (the first
    ``max_windows``). With ``log``, a JSON-lines file (:mod:`.window_log`), finished windows are
    read from it and new ones appended, so an interrupted run resumes; ``model_name`` goes in its
    header."""
    windows = token_ids.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise LlmbinError(f"evaluation text has {token_ids.numel()} tokens, fewer than one window of {seqlen}; lower --seqlen")
    check_positions(model.config, seqlen)
    check_token_ids(model, token_ids)
    weight = model.get_input_embeddings().weight
    device = weight.device if not weight.is_meta else "cpu"  # a dispatched model's hooks move inputs
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), weight.dtype)
    record = None if log is None else WindowLog(log, {"model": model_name, "dtype": str(dtype), "seqlen": seqlen,
                                                      "tokens_sha256": token_digest(token_ids)})
    done = {} if record is None else record.done
    nlls = []
    bar = tqdm(total=windows, desc="perplexity", unit="window", disable=not progress)
    for i in range(windows):
        if i in done and i != 0:  # window 0 always runs again: it checks the log belongs to this model
            nlls.append(done[i])
        else:
            ids = token_ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
            logits = model(ids, use_cache=False).logits[0, :-1].float()
            nll = F.cross_entropy(logits, ids[0, 1:], reduction="mean").item()
            if record is not None:
                record.check_first(nll) if i in done else record.append(i, nll)
            nlls.append(nll)
        bar.update()
    bar.close()
    return nlls


def perplexity(model, token_ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
               progress: bool = True) -> float:
    """``exp`` of the mean next-token NLL over ``numel // seqlen`` non-overlapping windows."""
    return ppl_of(window_nlls(model, token_ids, seqlen, max_windows, progress))


def dataset_window_nlls(model, tokenizer, dataset: str, *, eval_data: str | None = None, seqlen: int = 2048,
                        max_windows: int | None = None, progress: bool = True, log: str | os.PathLike | None = None,
                        model_name: str = "") -> list[float]:
    """:func:`window_nlls` of a data set's test text: ``dataset`` is wikitext2, c4, ptb or a text
    file; ``eval_data``, a local file holding that data set's text, is read instead if given."""
    from ..data.text import resolve_text

    ids = tokenizer(resolve_text(eval_data or dataset, "test"), return_tensors="pt").input_ids[0]
    return window_nlls(model, ids, seqlen, max_windows, progress=progress, log=log, model_name=model_name)


def dataset_perplexity(model, tokenizer, dataset: str, *, eval_data: str | None = None, seqlen: int = 2048,
                       max_windows: int | None = None, progress: bool = True) -> float:
    """:func:`perplexity` of a data set's test text (see :func:`dataset_window_nlls`)."""
    return ppl_of(dataset_window_nlls(model, tokenizer, dataset, eval_data=eval_data, seqlen=seqlen,
                                      max_windows=max_windows, progress=progress))
