"""The packed representation of one quantized weight matrix (checkpoint format version 1).

    ŵ[r, c] = μ[r, g] + Σ_p α[p, r, g] · (2·b[p, r, c] − 1)          g = c // group_size
    ŵ[r, c] = (2·b[0, r, c] − 1) · m · σ[r]        at salient positions (overrides the above)

``b`` are bit planes packed along the input dimension (see ``bitpack``). Salient weights are
symmetric ``salient_bits``-bit integers per output row: their sign is the plane-0 bit (which
a salient position would otherwise waste) and their magnitude ``m`` is stored in
``salient_bits - 1`` bit planes, in row-major position order.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from .bitpack import pack_bits, pack_codes, packed_row_bytes, unpack_bits, unpack_codes
from .positions import decode_positions, encode_positions

FORMAT_VERSION = 1


@dataclass
class SalientPart:
    positions: torch.Tensor  # uint8 stream, see ``positions``
    encoding: str
    count: int
    magnitudes: torch.Tensor  # uint8 bit planes (salient_bits - 1, bytes)
    scale: torch.Tensor  # fp16 (N,)
    bits: int


@dataclass
class PackedWeight:
    shape: tuple[int, int]
    planes: torch.Tensor  # uint8 (P, N, row_bytes)
    alpha: torch.Tensor  # fp16 (P, N, G)
    mu: torch.Tensor  # fp16 (N, G)
    group_size: int
    salient: SalientPart | None = None

    @classmethod
    def from_codes(cls, bits, alpha, mu, group_size, salient_mask=None, salient_mag=None, salient_scale=None,
                   salient_bits=8) -> "PackedWeight":
        """Build from unpacked codes: ``bits`` bool (P, N, K); ``salient_mag`` int (N, K), read at the mask."""
        shape = tuple(bits.shape[1:])
        salient = None
        if salient_mask is not None and bool(salient_mask.any()):
            encoding, stream = encode_positions(salient_mask)
            mags = salient_mag[salient_mask]
            salient = SalientPart(stream, encoding, int(mags.numel()), pack_codes(mags, salient_bits - 1),
                                  salient_scale.to(torch.float16), salient_bits)
        return cls(shape, pack_bits(bits), alpha.to(torch.float16), mu.to(torch.float16), group_size, salient)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``(N, K)`` weight; the plain-torch reference that every kernel must match."""
        N, K = self.shape
        signs = unpack_bits(self.planes, K).to(dtype) * 2 - 1
        expand = lambda t: t.to(dtype).repeat_interleave(self.group_size, dim=-1)[..., :K]  # noqa: E731
        W = expand(self.mu) + (expand(self.alpha) * signs).sum(dim=0)
        if self.salient is not None:
            s = self.salient
            pos = decode_positions(s.encoding, s.positions, self.shape)
            mags = unpack_codes(s.magnitudes, s.count).to(dtype)
            rows = pos // K
            W.view(-1)[pos] = signs[0].reshape(-1)[pos] * mags * s.scale.to(dtype)[rows]
        return W

    # -- serialisation -------------------------------------------------------------------
    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.planes": self.planes, f"{prefix}.alpha": self.alpha, f"{prefix}.mu": self.mu}
        if self.salient is not None:
            s = self.salient
            out.update({f"{prefix}.salient_positions": s.positions, f"{prefix}.salient_magnitudes": s.magnitudes,
                        f"{prefix}.salient_scale": s.scale})
        return out

    def metadata(self) -> dict:
        meta = {"shape": list(self.shape), "planes": int(self.planes.shape[0]), "group_size": self.group_size}
        if self.salient is not None:
            meta["salient"] = {"encoding": self.salient.encoding, "count": self.salient.count,
                               "bits": self.salient.bits}
        return meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, meta: dict) -> "PackedWeight":
        """Rebuild from checkpoint tensors, checking every shape against the metadata."""
        N, K = meta["shape"]
        P, G = meta["planes"], -(-K // meta["group_size"])
        take = lambda name: tensors[f"{prefix}.{name}"]  # noqa: E731
        expect = {"planes": (P, N, packed_row_bytes(K)), "alpha": (P, N, G), "mu": (N, G)}
        for name, shape in expect.items():
            if tuple(take(name).shape) != shape:
                raise ValueError(f"{prefix}.{name} has shape {tuple(take(name).shape)}, expected {shape}")
        salient = None
        if "salient" in meta:
            sm = meta["salient"]
            salient = SalientPart(take("salient_positions"), sm["encoding"], sm["count"], take("salient_magnitudes"),
                                  take("salient_scale"), sm["bits"])
            if tuple(salient.scale.shape) != (N,) or salient.magnitudes.shape[0] != sm["bits"] - 1 \
                    or salient.magnitudes.shape[1] * 8 < sm["count"]:
                raise ValueError(f"{prefix}: salient tensors do not match their metadata")
            if decode_positions(salient.encoding, salient.positions, (N, K)).numel() != sm["count"]:
                raise ValueError(f"{prefix}: salient positions do not match the salient count")
        return cls((N, K), take("planes"), take("alpha"), take("mu"), meta["group_size"], salient)

    def storage_bits(self) -> int:
        """Bits this weight occupies in the checkpoint (padding included)."""
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors("w").values())


def metadata_json(layers: dict[str, PackedWeight]) -> str:
    return json.dumps({name: pw.metadata() for name, pw in layers.items()}, sort_keys=True)
