"""Round-to-nearest sign binarization: the no-calibration baseline, ``ŵ = α·sign(w)``, ``α = mean|w|``."""
from __future__ import annotations

import torch

from ..config import RTNSignConfig
from ..packing.packed_weight import PackedWeight


def rtn_sign_quantize(W: torch.Tensor, H: torch.Tensor, config: RTNSignConfig) -> PackedWeight:
    W = W.float()
    alpha = W.abs().mean(dim=1)
    return PackedWeight.from_codes((W >= 0).unsqueeze(0), alpha[None, :, None], None, W.shape[1])
