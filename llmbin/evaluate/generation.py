"""Greedy generation through ``model.generate``, the path users call, with prefill and decode timed
apart: what ``llmbin generate`` prints and ``eval/decode_benchmark.py`` will record.

Prefill is the time from the call to the first new token (the prompt's forward pass and the first
choice); decode is the rate of the tokens after it. Both come from the streamer's clock, so the
figures are those of the text as a user sees it appear. One forward pass of the first prompt token
runs before the clock starts, so that the kernel's first load is not counted as prefill.
"""
from __future__ import annotations

import time

import torch
from transformers import TextStreamer
from transformers.generation.streamers import BaseStreamer

from ..errors import LlmbinError, check_token_ids


class TimedStreamer(TextStreamer):
    """Records when each new token arrives; prints the text as it comes only with ``echo``."""

    def __init__(self, tokenizer, echo: bool):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.echo = echo
        self.arrivals: list[float] = []

    def put(self, value):
        if not self.next_tokens_are_prompt:  # the first call carries the prompt itself
            self.arrivals.append(time.perf_counter())
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if self.echo:
            super().on_finalized_text(text, stream_end)


def timed_generate(model, tokenizer, prompt: str, max_new_tokens: int = 128, echo: bool = True) -> dict:
    """Greedy continuation of ``prompt``: ``{"text", "prompt_tokens", "new_tokens", "prefill_seconds",
    "prefill_tokens_per_s", "decode_tokens_per_s"}`` (decode is None with fewer than two new tokens)."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        raise LlmbinError("the prompt has no tokens; give some text with --prompt")
    check_token_ids(model, ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        model(ids[:, :1])  # the first call loads the kernel and allocates: not the model's speed
    out, timing = _timed(model, ids, max_new_tokens, TimedStreamer(tokenizer, echo), pad, exact=False)
    return {"text": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), **timing}


def time_decode(model, ids: torch.Tensor, new_tokens: int, pad_token_id: int = 0) -> tuple[torch.Tensor, dict]:
    """Exactly ``new_tokens`` greedy tokens after ``ids`` (an end-of-text token does not stop it),
    timed as :func:`timed_generate` times them: ``(all ids, timing)``. What a decode benchmark
    measures. Not ``min_new_tokens``: its logits processor masks the end-of-text ids over the whole
    vocabulary at every step (1.6 ms of a 54 ms step for Qwen2.5's 151,936 tokens), work that
    neither a user's generation nor llama-bench does."""
    return _timed(model, ids, new_tokens, _Clock(), pad_token_id, exact=True)


class _Clock(BaseStreamer):
    """Records when each new token arrives, and nothing else."""

    def __init__(self):
        self.arrivals: list[float] = []
        self._prompt = True

    def put(self, value):
        if self._prompt:  # the first call carries the prompt itself
            self._prompt = False
        else:
            self.arrivals.append(time.perf_counter())

    def end(self):
        pass


def _timed(model, ids, new_tokens: int, streamer, pad: int, exact: bool) -> tuple[torch.Tensor, dict]:
    forced = {"eos_token_id": None} if exact else {}
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, streamer=streamer, pad_token_id=pad, **forced)
    times = streamer.arrivals
    prefill = times[0] - start if times else time.perf_counter() - start
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
    return out, {"prompt_tokens": int(ids.shape[1]), "new_tokens": int(out.shape[1] - ids.shape[1]),
                 "prefill_seconds": prefill, "prefill_tokens_per_s": ids.shape[1] / prefill,
                 "decode_tokens_per_s": decode}
