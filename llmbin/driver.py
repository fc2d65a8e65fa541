"""The sequential driver: all model plumbing for layer-by-layer quantization lives here.

Capture the first decoder block's inputs, then for each block: accumulate each linear's
Hessian with hooks, quantize every linear with the method function, install the packed
layers, and run the *quantized* block to produce the next block's inputs. Only one block's
activations and Hessians are resident at a time.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms.hessian import accumulate_hessian
from .config import QuantConfig
from .errors import LlmbinError
from .models import decoder_layers, linear_layers, set_submodule
from .nn.binary_linear import BinaryLinear
from .packing.packed_weight import PackedWeight
from .registry import method_function

LayerDone = Callable[[int, dict[str, BinaryLinear]], None]


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calibration: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Run the model (where it lies) up to its first decoder block; return each sample's
    hidden states and the keyword arguments the blocks share (masks, rotary embeddings)."""
    block = decoder_layers(model)[0]
    device = model.get_input_embeddings().weight.device
    inputs, shared = [], {}

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden.cpu())
        if not shared:
            shared.update({k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")})
        raise _StopForward

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in calibration:
            try:
                model(ids.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return inputs, shared


def _run_block(block, inputs, kwargs, device, keep_outputs: bool = True) -> list[torch.Tensor]:
    outputs = []
    for hidden in inputs:
        out = block(hidden.to(device), **kwargs)
        if keep_outputs:
            outputs.append((out[0] if isinstance(out, tuple) else out).cpu())
    return outputs


@torch.no_grad()
def quantize_blocks(
    model: nn.Module,
    config: QuantConfig,
    calibration: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    done: dict[int, dict[str, BinaryLinear]] | None = None,
    on_block_done: LayerDone | None = None,
    progress: bool = True,
) -> None:
    """Quantize every linear layer of every decoder block in place.

    ``done`` maps block indices already quantized (e.g. resumed from disk) to their packed
    layers; they are installed and only run forward. ``on_block_done`` is called after each
    newly quantized block, so a caller can persist it before the next one starts.
    """
    method = method_function(config)
    blocks = decoder_layers(model)
    done = done or {}
    inputs, kwargs = capture_block_inputs(model, calibration)
    kwargs = {k: (tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device) if torch.is_tensor(v) else v)
              for k, v in kwargs.items()}
    bar = tqdm(range(len(blocks)), desc="quantizing blocks", unit="block", disable=not progress)
    for index in bar:
        block = blocks[index].to(device)
        if index in done:
            for name, layer in done[index].items():
                set_submodule(block, name, layer.to(device))
        else:
            bar.set_postfix_str("collecting Hessians")
            packed = _quantize_block(block, inputs, kwargs, method, config, device, index)
            if on_block_done is not None:
                on_block_done(index, packed)
        bar.set_postfix_str("propagating")
        inputs = _run_block(block, inputs, kwargs, device)
        blocks[index] = block.to("cpu")


def _quantize_block(block, inputs, kwargs, method, config, device, index) -> dict[str, BinaryLinear]:
    linears = linear_layers(block)
    stats = {name: [torch.zeros(m.in_features, m.in_features, device=device), 0] for name, m in linears.items()}

    def hook(name):
        def accumulate(_module, args, _output):
            stats[name][0], stats[name][1] = accumulate_hessian(stats[name][0], stats[name][1], args[0].float())
        return accumulate

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    try:
        _run_block(block, inputs, kwargs, device, keep_outputs=False)  # only the Hessian hooks matter here
    finally:
        for h in handles:
            h.remove()
    packed = {}
    for name, linear in linears.items():
        W, H = linear.weight.detach(), stats[name][0]
        if not torch.isfinite(W).all():
            raise LlmbinError(f"block {index} {name} has NaN or infinite weights; the model file is corrupt, re-download it")
        if not torch.isfinite(H).all():
            raise LlmbinError(f"block {index} {name} saw NaN or infinite activations in calibration; check the model and data")
        weight: PackedWeight = method(W, H, config)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        packed[name] = BinaryLinear(weight, bias).to(device)
        set_submodule(block, name, packed[name])
    return packed
