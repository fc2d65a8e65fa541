"""The block-wise tuning stage (``QuantConfig.tune``): after a decoder block's linears are packed,
tune what is continuous so the block's outputs follow the float model's.

The discrete choices stay as the layer-wise pass made them: sign planes, the class plane and
column mask, salient positions and their integer magnitudes. Tuned are the tensors that are
continuous and stored anyway, so the checkpoint's layout and bit count do not change:

* each packed layer's scales: ``alpha`` (α), ``mu`` (μ), ``col_scale`` (ARB's column scales) and
  ``salient_scale`` (PB-LLM's per-row step of the salient integers, so the salient values move
  on their stored grid: no re-quantization afterwards);
* every other float parameter of the block: its norm weights and the layers' biases.

Inputs and targets (as OmniQuant and AutoRound do): the block is fed the *quantized* model's
inputs (the driver's activation buffer, which has passed through the blocks already packed and
tuned) and its output is pulled towards the *float* model's output for the float model's inputs
(a second buffer that the driver propagates through the float blocks). So each block also
corrects what the blocks before it got wrong, which the layer-wise pass, fitting each layer to
its own inputs, cannot.

The loss is each window's output MSE divided by the target's mean square, so windows and blocks
weigh alike. Adam, one step per ``tune_batch`` windows (gradients accumulated, so memory is one
window's activations), ``tune_steps`` steps through the windows in a seeded order. Each tensor's
step size is ``tune_lr`` times its mean magnitude before tuning, since α (about 1e-2) and a norm
weight (about 1) need steps of their own scale. The tuned values are rounded to the checkpoint's
fp16 at the end, so the outputs propagated to the next block are the saved model's.

Under torch.distributed each rank holds its own windows (``llmbin.distributed``'s chunks). A step's
windows are drawn from all of them in the same seeded order; each window's gradient is computed by
the rank that holds it, sent to every rank, and the gradients are added in the step's order, the
additions a single process makes as it accumulates them. So every rank takes the same Adam step, and
the tuned block is bit-identical at any world size. The ranks work in parallel only within a step:
with ``tune_batch`` 1 (the default) the stage runs at one process's speed.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .nn.binary_linear import BinaryLinear
from .packing.packed_weight import STORAGE_DTYPE

TUNED_BUFFERS = ("alpha", "mu", "col_scale", "salient_scale")


def tuned_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """The block's tunable tensors by their state-dict names: packed layers' scales, then every float parameter."""
    out = {}
    for name, module in block.named_modules():
        if isinstance(module, BinaryLinear):
            for key in TUNED_BUFFERS:
                buf = getattr(module, key, None)
                if buf is not None:
                    out[f"{name}.{key}" if name else key] = buf
    for name, p in block.named_parameters():
        if p.is_floating_point():
            out[name] = p
    return out


def tuned_outside_packed(block: nn.Module) -> dict[str, torch.Tensor]:
    """The tuned tensors that no packed layer carries (norm weights): what a finished block's file
    must hold beside its packed layers."""
    inside = tuple(f"{n}." for n, m in block.named_modules() if isinstance(m, BinaryLinear) and n)
    return {n: t.detach() for n, t in tuned_tensors(block).items() if not n.startswith(inside)}


def _owner(block: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, key = name.rpartition(".")
    return (block.get_submodule(path) if path else block), key


def make_leaves(block: nn.Module) -> dict[str, tuple[torch.Tensor, torch.dtype]]:
    """Replace each tunable tensor by a float32 leaf that requires grad; returns name -> (leaf, dtype before)."""
    leaves = {}
    for name, tensor in tuned_tensors(block).items():
        module, key = _owner(block, name)
        leaf = tensor.detach().float().requires_grad_(True)
        if key in module._parameters:
            module._parameters[key] = nn.Parameter(leaf)
            leaf = module._parameters[key]
        else:
            setattr(module, key, leaf)
        leaves[name] = (leaf, tensor.dtype)
    return leaves


def freeze_leaves(block: nn.Module, leaves: dict[str, tuple[torch.Tensor, torch.dtype]]) -> None:
    """Round every tuned tensor to the checkpoint's fp16 and give it back its dtype, without grad:
    packed-layer scales are stored fp16; parameters keep the model's dtype, holding fp16 values."""
    for name, (leaf, dtype) in leaves.items():
        module, key = _owner(block, name)
        value = leaf.detach().to(STORAGE_DTYPE)
        if key in module._parameters:
            module._parameters[key] = nn.Parameter(value.to(dtype), requires_grad=False)
        else:
            setattr(module, key, value)


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def relative_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``‖output − target‖² / ‖target‖²``, the loss of one window."""
    return F.mse_loss(output, target) / target.pow(2).mean().clamp_min(1e-12)


@torch.no_grad()
def block_error(block: nn.Module, inputs, targets, kwargs, *, device, windows=None) -> float:
    """Mean ``relative_error`` of ``block`` over ``windows`` (default all) of the two buffers, in float32."""
    windows = range(len(inputs)) if windows is None else windows
    total = 0.0
    for i in windows:
        x = inputs[i].to(device=device, dtype=torch.float32)
        total += float(relative_error(_output(block(x, **kwargs)).float(), targets[i].to(device=device,
                                                                                      dtype=torch.float32)))
    return total / len(windows)


def _step_gradients(block_loss, leaves, part: list[int], slot: dict[int, int], ranks: distributed.Ranks,
                    device) -> float:
    """One step's gradients under torch.distributed: each of ``part``'s windows (global indices) run
    on the rank that holds it (``slot``: window -> its place in this rank's buffers), every
    gradient sent to every rank, and summed into the leaves' ``.grad`` in ``part``'s order, as
    ``backward`` accumulates them in one process. Returns the step's loss."""
    names = list(leaves)
    mine: dict[str, torch.Tensor] = {}
    losses: dict[str, float] = {}
    for position, window in enumerate(part):
        if window in slot:
            loss = block_loss(slot[window])
            loss.backward()
            for name in names:
                grad = leaves[name][0].grad
                if grad is not None:
                    mine[f"{position}/{name}"] = grad
                leaves[name][0].grad = None
            losses[str(position)] = float(loss.detach())
    grads, step_losses = {}, {}
    for rank in sorted({distributed.window_owner(w, ranks) for w in part}):
        tensors, info = distributed.broadcast(mine if rank == ranks.rank else None,
                                              {"losses": losses} if rank == ranks.rank else None, rank, ranks, device)
        grads.update(tensors)
        step_losses.update(info["losses"])
    total = 0.0
    for position in range(len(part)):
        total += step_losses[str(position)]
        for name in names:
            grad = grads.get(f"{position}/{name}")
            if grad is None:
                continue
            leaf = leaves[name][0]
            if leaf.grad is None:
                leaf.grad = grad.clone()
            else:
                leaf.grad += grad
    return total


def tune_block(block: nn.Module, inputs, targets, kwargs: dict, *, steps: int, batch: int, lr: float,
               device: torch.device | str, seed: int = 0, windows: int | None = None,
               ranks: distributed.Ranks = distributed.SINGLE) -> dict:
    """Tune ``block`` in place so that ``block(inputs[i])`` follows ``targets[i]`` (both indexable
    buffers of per-window activations, e.g. the driver's stores). Under torch.distributed
    (``ranks``) the buffers hold this rank's share of the ``windows`` calibration windows
    (``distributed.own_windows``, in order). Returns the mean loss of the first and of the last
    steps (about one pass over the windows each) and the seconds taken."""
    start = time.perf_counter()
    device = torch.device(device)
    windows = len(inputs) if windows is None else windows
    leaves = make_leaves(block)
    groups = [{"params": [leaf], "lr": lr * float(leaf.detach().abs().mean().clamp_min(1e-8))}
              for leaf, _ in leaves.values()]
    optimizer = torch.optim.Adam(groups)
    order = torch.cat([torch.randperm(windows, generator=torch.Generator().manual_seed(seed + epoch), device="cpu")
                       for epoch in range(-(-steps * batch // windows))]).tolist()
    slot = {w: i for i, w in enumerate(distributed.own_windows(ranks, windows))}

    def block_loss(i: int) -> torch.Tensor:
        x = inputs[i].to(device=device, dtype=torch.float32)
        target = targets[i].to(device=device, dtype=torch.float32)
        return relative_error(_output(block(x, **kwargs)).float(), target) / batch

    losses = []
    try:
        with torch.enable_grad():
            for step in range(steps):
                part = order[step * batch:(step + 1) * batch]
                if ranks.distributed:
                    total = _step_gradients(block_loss, leaves, part, slot, ranks, device)
                else:
                    total = 0.0
                    for i in part:
                        loss = block_loss(i)
                        loss.backward()
                        total += float(loss.detach())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(total)
    finally:
        freeze_leaves(block, leaves)
    span = max(1, min(steps // 2, -(-windows // batch)))  # about one pass over the windows, at each end
    return {"loss_first": sum(losses[:span]) / span, "loss_last": sum(losses[-span:]) / span,
            "seconds": time.perf_counter() - start}
