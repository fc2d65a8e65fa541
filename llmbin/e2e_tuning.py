"""The end-to-end pass (``QuantConfig.e2e_steps``): after every block is packed (and, with
``tune``, tuned block by block), tune the same continuous tensors of all blocks together so the
quantized model's next-token distribution follows the float model's.

Tuned: each block's ``block_tuning.tuned_tensors`` (packed layers' α, μ, column and salient
scales, norm weights, biases) and the final norm's weight. Nothing discrete moves, so the
checkpoint's layout and bit count do not change. The loss is ``KL(float ‖ quantized)`` per
token, averaged over a window; Adam, one calibration window per step in a seeded order, each
tensor's step ``e2e_lr`` times its mean magnitude before tuning (as the block-wise stage).

The float side comes from the driver, which propagates the float activations through each float
block beside the quantized ones (as for ``tune``); after the last block they go through the final
norm, as it is before tuning, to give each window's float final hidden states,
``4 × seqlen × hidden`` bytes per window. Its logits are recomputed from them with the model's
own output matrix, which the pass does not tune, in chunks of ``CHUNK`` tokens, so no window's
full ``seqlen × vocab`` logits exist at once on either side. The quantized model runs with
transformers' gradient checkpointing per decoder block, so its autograd memory is one block's
activations plus the block boundaries.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .block_tuning import freeze_leaves, make_leaves
from .models import decoder_layers

CHUNK = 256  # tokens per piece of the vocabulary-wide loss


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm after the last decoder block (``model.model.norm`` in Llama, Qwen2, Mistral), if the model has one."""
    return getattr(model.base_model, "norm", None)


@torch.no_grad()
def float_final_states(model: nn.Module, calibration: torch.Tensor, device) -> list[torch.Tensor]:
    """Each calibration window's hidden states after the float model's last norm, in float32 on the CPU."""
    return [model.base_model(ids.unsqueeze(0).to(device), use_cache=False).last_hidden_state[0].float().cpu()
            for ids in calibration]


@torch.no_grad()
def final_states(model: nn.Module, last_block_outputs, device) -> list[torch.Tensor]:
    """The float model's final hidden states from its last block's outputs (an indexable buffer of
    windows, as the driver keeps them), through ``model``'s final norm as it is now: call it before
    the pass tunes that norm. Float32, on the CPU."""
    norm = final_norm(model)
    dtype = norm.weight.dtype
    return [norm(last_block_outputs[i].to(device=device, dtype=dtype)).float().cpu()
            for i in range(len(last_block_outputs))]


def kl_backward(hidden: torch.Tensor, target: torch.Tensor, head: nn.Module) -> float:
    """Mean per-token ``KL(softmax(head(target)) ‖ softmax(head(hidden)))`` over the ``(T, hidden)``
    rows; backpropagates it into ``hidden``'s graph one chunk of tokens at a time. Returns the loss."""
    leaf = hidden.detach().requires_grad_(True)
    total, tokens = 0.0, hidden.shape[0]
    for start in range(0, tokens, CHUNK):
        with torch.no_grad():
            t_logp = F.log_softmax(head(target[start:start + CHUNK]).float(), dim=-1)
        s_logp = F.log_softmax(head(leaf[start:start + CHUNK]).float(), dim=-1)
        loss = (t_logp.exp() * (t_logp - s_logp)).sum() / tokens
        loss.backward()
        total += float(loss.detach())
    hidden.backward(leaf.grad)
    return total


def _checkpointing(model: nn.Module, on: bool) -> None:
    """transformers' per-block gradient checkpointing. It acts only on blocks in training mode, so the
    blocks alone are switched (their dropout modules stay in eval mode: the pass is deterministic)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return
    if on:  # transformers 5 renamed the switch; 4.x has only the older name
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    for block in decoder_layers(model):
        block.training = on


def tune_end_to_end(model: nn.Module, calibration: torch.Tensor, targets: list[torch.Tensor], *, steps: int,
                    lr: float, device, seed: int = 0, progress: bool = True) -> dict:
    """Tune ``model``'s blocks and final norm in place so its next-token distribution on each
    calibration window follows the float model's, given as ``targets[i]``, window ``i``'s hidden
    states after the float model's last norm (:func:`float_final_states`). The model is on
    ``device``. The tuned values end rounded to the checkpoint's fp16 (``block_tuning.freeze_leaves``).
    Returns the mean loss over the first and over the last pass of windows, and the seconds taken."""
    start = time.perf_counter()
    for p in model.parameters():  # only the leaves below get gradients, not the embedding or output matrix
        p.requires_grad_(False)
    owners = list(decoder_layers(model)) + [m for m in (final_norm(model),) if m is not None]
    leaves = [make_leaves(owner) for owner in owners]
    optimizer = torch.optim.Adam([{"params": [leaf], "lr": lr * float(leaf.detach().abs().mean().clamp_min(1e-8))}
                                  for owned in leaves for leaf, _ in owned.values()])
    order = torch.cat([torch.randperm(len(calibration), generator=torch.Generator().manual_seed(seed + epoch),
                                      device="cpu")
                       for epoch in range(-(-steps // len(calibration)))]).tolist()
    head, losses = model.get_output_embeddings(), []
    bar = tqdm(total=steps, desc="end-to-end pass", unit="step", disable=not progress)
    _checkpointing(model, True)
    try:
        with torch.enable_grad():
            for step in range(steps):
                i = order[step]
                hidden = model.base_model(calibration[i].unsqueeze(0).to(device), use_cache=False).last_hidden_state[0]
                losses.append(kl_backward(hidden, targets[i].to(device), head))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update()
                bar.set_postfix(kl=f"{losses[-1]:.4f}")
    finally:
        bar.close()
        _checkpointing(model, False)
        for owner, owned in zip(owners, leaves):
            freeze_leaves(owner, owned)
    span = min(len(calibration), steps)
    return {"e2e_kl_first": sum(losses[:span]) / span, "e2e_kl_last": sum(losses[-span:]) / span,
            "e2e_seconds": time.perf_counter() - start}
