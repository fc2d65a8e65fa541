"""One layer through the pipeline: the stages configured once on ``QuantConfig``, around the
method's function, which only fits the layer.

1. ``rotate``: the problem is moved into a seeded randomly rotated basis (``incoherence``);
2. the method's function ``(W, H, config) -> PackedWeight`` fits the layer;
3. ``refit_scales``: the scales are re-solved for least Hessian-weighted error with the bits
   fixed (``scales.refit_scales``), against the weights the method fitted (dead inputs zeroed,
   as every method prepares them) and the damped Hessian;
4. the rotation's seeds are recorded in the packed weight.

Model-level stages (distillation) follow in ``llmbin.quantize``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ..config import QuantConfig
from ..packing.packed_weight import PackedWeight
from ..packing.rotation import LayerRotation
from .hessian import prepare_hessian
from .incoherence import rotate_problem
from .scales import refit_scales

MethodFn = Callable[[torch.Tensor, torch.Tensor, QuantConfig], PackedWeight]


def refit_stage(packed: PackedWeight, W: torch.Tensor, H: torch.Tensor, config: QuantConfig,
                own_hessian: bool = False) -> PackedWeight:
    """``packed`` with its scales refitted (``scales.refit_scales``) to ``W`` under ``H``, both
    prepared as the methods prepare them (float32, dead inputs zeroed, ``H`` damped: in place
    when ``own_hessian`` says that nobody else holds this float32 ``H``)."""
    owned = own_hessian and H.dtype == torch.float32
    return refit_scales(packed, *prepare_hessian(W.float(), H.float(), config.percdamp, in_place=owned))


def quantize_layer(method: MethodFn, W: torch.Tensor, H: torch.Tensor, config: QuantConfig,
                   rotation: LayerRotation | None = None) -> PackedWeight:
    """``method(W, H, config)`` with the layer stages ``config`` asks for, in the basis ``rotation``
    gives (or as is, without one)."""
    if rotation is not None:
        W, H = rotate_problem(W, H, rotation)
    packed = method(W, H, config)
    if config.wants_refit():  # a rotated H is this function's own copy, damped in place
        packed = refit_stage(packed, W, H, config, own_hessian=rotation is not None)
    return packed if rotation is None else replace(packed, rotation=rotation)
