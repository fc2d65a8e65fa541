"""``BinaryLinear``: a linear layer that holds its weight packed, as the checkpoint stores it."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LlmbinError
from ..kernels.dispatch import kernel_path
from ..kernels.ops import LUT_MAX_WORK, packed_linear
from ..kernels.plan import KernelPlan, build_plan
from ..kernels.rotate import rotate
from ..packing.packed_weight import PackedWeight
from ..packing.rotation import OrthogonalTransform

_VERSION = operator.attrgetter("_version")


class BinaryLinear(nn.Module):
    """Every tensor of the ``PackedWeight`` is a buffer under its format name, so the module's
    state dict is exactly the checkpoint's entries for this layer; ``layout`` is its metadata."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.layout = packed.metadata()
        self.rotation = packed.rotation
        for name, tensor in packed.named_tensors().items():
            self.register_buffer(name, tensor)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.dense_cache = False  # decode once and keep the dense weight (evaluation speed, not memory)
        self._dense: torch.Tensor | None = None
        self._plan: tuple[tuple, KernelPlan] | None = None  # (buffer versions, full plan)
        self._light: tuple[tuple, KernelPlan] | None = None  # (buffer versions, light plan)
        self._transforms: dict[tuple, tuple[OrthogonalTransform, OrthogonalTransform | None]] = {}

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "BinaryLinear":
        """Plain sign binarization with a per-row scale α = mean|w| (no calibration)."""
        W = linear.weight.detach().float()
        alpha = W.abs().mean(dim=1)
        packed = PackedWeight.from_codes((W >= 0).unsqueeze(0), alpha[None, :, None], None, W.shape[1])
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(packed, bias)

    def packed(self) -> PackedWeight:
        return PackedWeight.from_tensors(dict(self.named_buffers(recurse=False)), "", self.layout, validate=False)

    def kernel_plan(self, rows: int | None = None) -> KernelPlan:
        """The kernel's lowering of this layer, built once and rebuilt only if a buffer changes
        (moved to another device, or loaded into in place).

        The full plan (table-lookup tiles, PB-LLM's salient lists: up to 3.4 bits per weight on
        top of the packed ones) is what small batches need to be fast. A CPU call of more than
        ``LUT_MAX_WORK`` ``rows`` (compute-bound: bands of decoded rows + GEMM) is served by the
        full plan if it exists, else by a light one that copies nothing (no tiles, salient part
        read from the checkpoint's own streams), so evaluating long windows keeps a loaded
        model at about its packed size."""
        if torch.compiler.is_compiling():
            # A traced graph cannot check buffer versions, nor build a plan once rather than on
            # every step: it reads the full plan an eager call built (prepare_decode builds them
            # all). Graph guards retrace it when a move drops the plans.
            built = self._plan
            if built is None:
                raise LlmbinError(f"{self.extra_repr()}: a compiled packed layer needs its kernel plan built by an "
                                  "eager call first; call llmbin.prepare_decode(model) before compiling")
            return built[1]
        buffers = self._buffers.values()  # C-level maps: this runs on every call
        key = (tuple(map(id, buffers)), tuple(map(_VERSION, buffers)))
        if self._plan is not None and self._plan[0] == key:
            return self._plan[1]
        if rows is not None and rows > LUT_MAX_WORK and self.weight.is_cpu:
            if self._light is None or self._light[0] != key:
                self._light = (key, build_plan(self.packed(), tiles=False, salient_stream=True))
            return self._light[1]
        self._plan, self._light = (key, build_plan(self.packed())), None
        return self._plan[1]

    def _apply(self, fn, recurse=True):
        # A move (to a device, a dtype, or to meta when the driver releases a finished block)
        # makes the plans and the dense copy stale: drop them rather than keep their memory.
        # Kept, every block a streamed run had finished held its plans (megabytes per layer at 7B).
        self._plan = self._light = self._dense = None
        self._transforms = {}
        return super()._apply(fn, recurse)

    def transforms(self, x: torch.Tensor) -> tuple[OrthogonalTransform | None, OrthogonalTransform | None]:
        """The rotation's ``(T, S)`` on ``x``'s device and dtype (built once), or ``(None, None)``."""
        if self.rotation is None:
            return None, None
        key = (x.device, x.dtype)
        if key not in self._transforms:
            self._transforms[key] = self.rotation.transforms((self.out_features, self.in_features), x.device, x.dtype)
        return self._transforms[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = None if self.dense_cache else kernel_path(x)
        if path is not None and not (torch.is_grad_enabled() and (x.requires_grad or self._trains_scales())):
            # rotated: y = Sᵀ·(Ŵ'·(T·x)); the kernel only ever sees the stored codes' matrix Ŵ'
            T, S = self.transforms(x)
            y = packed_linear(x if T is None else rotate(x, T), self.kernel_plan(x.numel() // self.in_features), path)
            y = y if S is None else rotate(y, S, transpose=True)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.dense_cache:
            if self._dense is None or self._dense.dtype != x.dtype:
                self._dense = self.packed().dense(x.dtype)
            return F.linear(x, self._dense, bias)
        # the reference path; also whenever autograd needs it (distillation): the kernels have no backward
        return F.linear(x, self.packed().dense(x.dtype), bias)

    def _trains_scales(self) -> bool:
        return any(b.requires_grad for b in self._buffers.values())

    def extra_repr(self) -> str:
        salient = f", salient={self.layout['salient']['count']}" if "salient" in self.layout else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"planes={self.layout['planes']}{salient}{', rotated' if self.rotation is not None else ''}")
