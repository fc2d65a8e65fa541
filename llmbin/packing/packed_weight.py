"""The packed representation of one quantized weight matrix (checkpoint format version 5; the
layer layout is that of version 4).

Every weight ``(r, c)`` has a *class* κ(r, c) and P sign bits ``b[p, r, c]``; with
``g = c // group_size`` the weight is

    ŵ[r, c] = Σ_{m : means[m] = κ} μ[m, r, g]
            + Σ_{t : terms[t] = (p, κ)} α[t, r, g] · β[t, c] · (2·b[p, r, c] − 1)

* ``terms`` lists the (plane, class) pairs that carry a scale; ``β`` (per-column scales,
  ARB-RC) is 1 when absent. With ``pow2_planes`` (uniform grids, e.g. GPTQ) one α is stored
  and term ``(p, 0)`` uses ``α·2^p``, so a b-bit grid costs one scale, not b. ``means`` lists the classes that carry a per-row mean.
* Classes: all weights are class 0, unless ``class_plane`` is set (then a weight's class is
  that plane's bit, 0 or 1) and/or ``column_mask`` is set (then every weight in a masked
  column is class ``C − 1``, the last class). BiLLM-style layouts use both: in salient
  columns the class plane is free, so it carries the residual sign.
* Salient weights (PB-LLM) override the formula: ``ŵ = (2·b[0, r, c] − 1) · m · σ[r]``,
  symmetric ``salient_bits``-bit integers whose sign is the plane-0 bit (which a salient
  position would otherwise waste) and whose magnitude ``m`` is stored in ``salient_bits − 1``
  bit planes, in row-major position order; positions are coded by ``positions``.

Sign planes and the column mask are packed along the input dimension (see ``bitpack``).

Rotated layers (version 4, ``--rotate``): with ``rotation`` set, the codes above describe
``Ŵ' ≈ S·W·Tᵀ`` for the seeded orthogonal transforms of ``rotation`` (T on the input side, S
on the output side if it has an output seed) and the layer computes ``y = Sᵀ·Ŵ'·(T·x)``.
``decode`` gives ``Ŵ'`` (what a kernel computes), ``dense`` the weight in the model's basis.

Stored names: the sign planes are stored as ``weight`` (version 3; ``planes`` before), the
name every ``nn.Linear`` weight has. A program that does not know the format (transformers
without ``import llmbin``) then meets a uint8 ``(P, N, row_bytes)`` tensor where it expects
an ``(N, K)`` float weight and refuses to load, instead of initialising that layer at random.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from .bitpack import pack_bits, pack_codes, packed_row_bytes, unpack_bits, unpack_codes
from .positions import decode_positions, encode_positions
from .rotation import LayerRotation

FORMAT_VERSION = 5
# 4 = 3 plus the optional ``rotation``: a version-3 reader must refuse it, not ignore it.
# 5 = 4 plus the files' tensor digests (``storage``), which a version-5 reader requires.
# 6 = 5 plus quantized tables (``packing.table``): written only by checkpoints that have one, so
# that every other checkpoint stays readable by version-5 readers.
TABLE_VERSION = 6
READABLE_VERSIONS = (3, 4, 5, 6)
STORAGE_DTYPE = torch.float16  # every float tensor a checkpoint stores (scales, means, embeddings, norms)
PLANES_NAME = "weight"  # the stored name of the sign planes (see the module docstring)


def stored_float(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to ``STORAGE_DTYPE`` and back to float32: the values a checkpoint will hold,
    so that a fit is finished against what is stored rather than against its float32 optimum."""
    return t.to(STORAGE_DTYPE).float()


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
    alpha: torch.Tensor  # fp16 (T, N, G)
    mu: torch.Tensor | None  # fp16 (M, N, G)
    group_size: int
    terms: tuple[tuple[int, int], ...] = ((0, 0),)
    means: tuple[int, ...] = (0,)
    class_plane: int | None = None
    column_mask: torch.Tensor | None = None  # uint8 (row_bytes,)
    col_scale: torch.Tensor | None = None  # fp16 (T, K)
    salient: SalientPart | None = None
    pow2_planes: bool = False  # alpha is (1, N, G); term (p, 0) scales by alpha[0]·2^p
    rotation: LayerRotation | None = None  # the codes describe S·W·Tᵀ (see ``rotation``); seeds only

    def term_alpha(self, t: int) -> torch.Tensor:
        """``(N, G)`` scale of term ``t``."""
        return self.alpha[0] * 2.0 ** self.terms[t][0] if self.pow2_planes else self.alpha[t]

    @property
    def num_classes(self) -> int:
        return (2 if self.class_plane is not None else 1) + (1 if self.column_mask is not None else 0)

    @classmethod
    def from_codes(cls, bits, alpha, mu, group_size, *, terms=None, means=None, class_plane=None, column_mask=None,
                   col_scale=None, salient_mask=None, salient_mag=None, salient_scale=None,
                   salient_bits=8, pow2_planes=False) -> "PackedWeight":
        """Build from unpacked codes: ``bits`` bool (P, N, K); ``alpha`` (T, N, G); ``mu`` (M, N, G) or None;
        ``column_mask`` bool (K,); ``salient_mag`` int (N, K), read at ``salient_mask``."""
        shape = tuple(bits.shape[1:])
        terms = tuple((int(p), int(c)) for p, c in terms) if terms is not None else tuple((p, 0) for p in range(bits.shape[0]))
        means = tuple(int(c) for c in means) if means is not None else ((0,) if mu is not None else ())
        salient = None
        if salient_mask is not None and bool(salient_mask.any()):
            encoding, stream = encode_positions(salient_mask)
            mags = salient_mag[salient_mask]
            salient = SalientPart(stream, encoding, int(mags.numel()), pack_codes(mags, salient_bits - 1),
                                  salient_scale.to(STORAGE_DTYPE), salient_bits)
        half = lambda t: None if t is None else t.to(STORAGE_DTYPE)  # noqa: E731
        return cls(shape, pack_bits(bits), alpha.to(STORAGE_DTYPE), half(mu), group_size, terms, means, class_plane,
                   None if column_mask is None else pack_bits(column_mask), half(col_scale), salient, pow2_planes)

    def classes(self, bits: torch.Tensor | None = None) -> torch.Tensor:
        """Class index of every weight, long (N, K); ``bits`` are the unpacked planes if already at hand
        (of any run of rows: the result then has their rows)."""
        N, K = self.shape if bits is None else bits.shape[1:]
        cls = torch.zeros(N, K, dtype=torch.long, device=self.planes.device)
        if self.class_plane is not None:
            bits = unpack_bits(self.planes[self.class_plane], K) if bits is None else bits[self.class_plane]
            cls = bits.long()
        if self.column_mask is not None:
            cls = cls.masked_fill(unpack_bits(self.column_mask, K).unsqueeze(0), self.num_classes - 1)
        return cls

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``(N, K)`` weight; the plain-torch reference that every kernel must match."""
        N, K = self.shape
        bits = unpack_bits(self.planes, K)
        signs = bits.to(dtype) * 2 - 1
        cls = self.classes(bits) if self.num_classes > 1 else None
        expand = lambda t: t.to(dtype).repeat_interleave(self.group_size, dim=-1)[..., :K]  # noqa: E731
        in_class = lambda v, c: v if cls is None else v * (cls == c).to(dtype)  # noqa: E731
        W = torch.zeros(N, K, dtype=dtype, device=self.planes.device)
        for t, (p, c) in enumerate(self.terms):
            scaled = expand(self.term_alpha(t)) * signs[p]
            if self.col_scale is not None:
                scaled = scaled * self.col_scale[t].to(dtype)
            W = W + in_class(scaled, c)
        for m, c in enumerate(self.means):
            W = W + in_class(expand(self.mu[m]), c)
        if self.salient is not None:
            s = self.salient
            pos = decode_positions(s.encoding, s.positions, self.shape)
            mags = unpack_codes(s.magnitudes, s.count).to(dtype)
            rows = pos // K
            W.view(-1)[pos] = signs[0].reshape(-1)[pos] * mags * s.scale.to(dtype)[rows]
        return W

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The layer's ``(N, K)`` weight in the model's basis: ``decode()`` with the rotation undone
        (``Sᵀ·Ŵ'·T``); equal to ``decode()`` for an unrotated layer."""
        W = self.decode(dtype)
        if self.rotation is None:
            return W
        T, S = self.rotation.transforms(self.shape, W.device, dtype)
        W = T.apply_transpose(W)  # rows: Ŵ'·T
        return W if S is None else S.apply_transpose(W.T).T

    # -- serialisation -------------------------------------------------------------------
    def named_tensors(self) -> dict[str, torch.Tensor]:
        out = {PLANES_NAME: self.planes, "alpha": self.alpha}
        optional = {"mu": self.mu, "column_mask": self.column_mask, "col_scale": self.col_scale}
        out.update({k: v for k, v in optional.items() if v is not None})
        if self.salient is not None:
            s = self.salient
            out.update({"salient_positions": s.positions, "salient_magnitudes": s.magnitudes, "salient_scale": s.scale})
        return out

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": v for k, v in self.named_tensors().items()}

    def metadata(self) -> dict:
        meta = {"shape": list(self.shape), "planes": int(self.planes.shape[0]), "group_size": self.group_size,
                "terms": [list(t) for t in self.terms], "means": list(self.means), "class_plane": self.class_plane,
                "column_mask": self.column_mask is not None, "col_scale": self.col_scale is not None,
                "pow2_planes": self.pow2_planes}
        if self.rotation is not None:
            meta["rotation"] = self.rotation.metadata()
        if self.salient is not None:
            meta["salient"] = {"encoding": self.salient.encoding, "count": self.salient.count,
                               "bits": self.salient.bits}
        return meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, meta: dict,
                     validate: bool = True) -> "PackedWeight":
        """Rebuild from checkpoint tensors (keys ``prefix.name``, or bare names when ``prefix`` is empty),
        checking every shape against the metadata unless ``validate`` is false."""
        take = lambda name: tensors[f"{prefix}.{name}" if prefix else name]  # noqa: E731
        N, K = meta["shape"]
        terms, means = tuple(tuple(t) for t in meta["terms"]), tuple(meta["means"])
        mu = take("mu") if means else None
        column_mask = take("column_mask") if meta.get("column_mask") else None
        col_scale = take("col_scale") if meta.get("col_scale") else None
        salient = None
        if "salient" in meta:
            sm = meta["salient"]
            salient = SalientPart(take("salient_positions"), sm["encoding"], sm["count"], take("salient_magnitudes"),
                                  take("salient_scale"), sm["bits"])
        pw = cls((N, K), take(PLANES_NAME), take("alpha"), mu, meta["group_size"], terms, means, meta.get("class_plane"),
                 column_mask, col_scale, salient, bool(meta.get("pow2_planes", False)),
                 LayerRotation.from_metadata(meta.get("rotation")))
        if validate:
            pw._validate()
        return pw

    def _validate(self) -> None:
        N, K = self.shape
        P, T, M, G = self.planes.shape[0], len(self.terms), len(self.means), -(-K // self.group_size)
        C = self.num_classes
        A = 1 if self.pow2_planes else T
        expect = {"planes": (self.planes, (P, N, packed_row_bytes(K))), "alpha": (self.alpha, (A, N, G)),
                  "mu": (self.mu, (M, N, G)), "column_mask": (self.column_mask, (packed_row_bytes(K),)),
                  "col_scale": (self.col_scale, (T, K))}
        for name, (tensor, shape) in expect.items():
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
        if any(not (0 <= p < P and 0 <= c < C) for p, c in self.terms) or any(not 0 <= c < C for c in self.means):
            raise ValueError(f"terms {self.terms} / means {self.means} refer to planes or classes that do not exist")
        if self.pow2_planes and any(c != 0 for _, c in self.terms):
            raise ValueError("pow2_planes layouts have a single class")
        if self.class_plane is not None and not 0 <= self.class_plane < P:
            raise ValueError(f"class plane {self.class_plane} does not exist")
        if self.planes.dtype != torch.uint8 or (self.column_mask is not None and self.column_mask.dtype != torch.uint8):
            raise ValueError("packed bits must be uint8")
        if self.salient is not None:
            s = self.salient
            if tuple(s.scale.shape) != (N,) or s.magnitudes.shape[0] != s.bits - 1 or s.magnitudes.shape[1] * 8 < s.count:
                raise ValueError("salient tensors do not match their metadata")
            if not s.positions.is_meta and decode_positions(s.encoding, s.positions, (N, K)).numel() != s.count:
                raise ValueError("salient positions do not match the salient count")

    def storage_bits(self) -> int:
        """Bits this weight occupies in the checkpoint (padding included; a rotation's seeds too)."""
        seeds = self.rotation.storage_bits() if self.rotation is not None else 0
        return seeds + sum(t.numel() * t.element_size() * 8 for t in self.named_tensors().values())


def metadata_json(layers: dict[str, PackedWeight]) -> str:
    return json.dumps({name: pw.metadata() for name, pw in layers.items()}, sort_keys=True)
