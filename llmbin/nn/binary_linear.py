"""``BinaryLinear``: a linear layer that holds its weight packed, as the checkpoint stores it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..packing.packed_weight import PackedWeight, SalientPart

_SALIENT = ("salient_positions", "salient_magnitudes", "salient_scale")


class BinaryLinear(nn.Module):
    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.group_size = packed.group_size
        self.register_buffer("planes", packed.planes)
        self.register_buffer("alpha", packed.alpha)
        self.register_buffer("mu", packed.mu)
        self.salient_meta = None
        if packed.salient is not None:
            s = packed.salient
            self.salient_meta = {"encoding": s.encoding, "count": s.count, "bits": s.bits}
            for name, tensor in zip(_SALIENT, (s.positions, s.magnitudes, s.scale)):
                self.register_buffer(name, tensor)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "BinaryLinear":
        """Plain sign binarization with a per-row scale α = mean|w| (no calibration)."""
        W = linear.weight.detach().float()
        alpha = W.abs().mean(dim=1)
        packed = PackedWeight.from_codes((W >= 0).unsqueeze(0), alpha[None, :, None],
                                         torch.zeros_like(alpha)[:, None], W.shape[1])
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(packed, bias)

    def packed(self) -> PackedWeight:
        salient = None
        if self.salient_meta is not None:
            m = self.salient_meta
            salient = SalientPart(self.salient_positions, m["encoding"], m["count"], self.salient_magnitudes,
                                  self.salient_scale, m["bits"])
        return PackedWeight((self.out_features, self.in_features), self.planes, self.alpha, self.mu,
                            self.group_size, salient)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.packed().decode(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        salient = f", salient={self.salient_meta['count']}" if self.salient_meta else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, planes={self.planes.shape[0]}{salient}"
