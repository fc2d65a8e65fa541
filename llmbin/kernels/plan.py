"""Lower any ``PackedWeight`` layout to one kernel-friendly form: sums of *bit products*.

Every layout the checkpoint format has (PB-LLM, BiLLM/ARB with class planes and column masks,
DB-LLM's two planes, GPTQ's power-of-two planes) is a polynomial in the sign bits, so

    y[b, r] = Σ_k Σ_g coef[k, r, g] · Σ_{c ∈ g} x[b, c] · colw[var_k, c] · Π_{p ∈ mono_k} bit[p, r, c]
            + Σ_{salient (r, c)} x[b, c] · delta[r, c]

* ``mono_k`` is a set of planes (a bit mask over plane indices): the product of their bits. The
  empty set is the constant 1, so that product's inner sum does not depend on the row.
* ``colw`` holds per-column activation weights: the column mask (class C−1 against the rest)
  and ARB-RC's per-column scales fold into the activations, not the bits.
* Signs expand as ``2b − 1`` and class indicators as ``b_q`` or ``1 − b_q``, with ``b·b = b``.
* Salient weights (PB-LLM) replace the formula: a CSR list per row adds ``delta = salient −
  formula`` at each one's column, so the dense bit products stay branch-free. In PB-LLM's own
  layout (one plane, one group per row, no column weights) the formula at a salient position
  depends only on the row and its bit b, which is also the salient sign, so each row's list is
  split by b and an entry is its column and its uint8 magnitude m (3 bytes, not 6):
  ``delta = scale_b[r] · m + base_b[r]``. Other layouts keep ``delta`` in float32.
* The *stream* form of that layout (``salient_stream=True``) has no lists: the kernel reads the
  checkpoint's nibble-gap positions and magnitude bit planes themselves, through a per-row
  index, so a plan adds 24 bytes per row instead of 3 bytes per salient weight. Slower per
  entry, it serves compute-bound (large-batch) calls, where decoding is a small part of the work.

The kernels (C++ and Triton) evaluate exactly this; :func:`plan_decode` is its dense form, used
to check a plan against ``PackedWeight.decode``.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from dataclasses import dataclass

import torch

from ..packing.bitpack import unpack_bits, unpack_codes
from ..packing.packed_weight import PackedWeight
from ..packing.positions import NIBBLE_GAP, NIBBLE_MAX_GAP, decode_positions

Poly = dict[int, float]  # plane-set bit mask -> coefficient; mask 0 is the constant 1


def _mul(a: Poly, b: Poly) -> Poly:
    out: Poly = {}
    for ma, ca in a.items():
        for mb, cb in b.items():
            out[ma | mb] = out.get(ma | mb, 0.0) + ca * cb
    return {m: c for m, c in out.items() if c != 0.0}


@dataclass(frozen=True)
class KernelPlan:
    """A layer's lowering, as every kernel entry point takes it.

    The fields below, in this order, are the kernels' one argument list: :meth:`op_args` gives
    them as two lists, the tensors and the integers, and the ``llmbin::packed_linear`` operator,
    its fake implementation and the C++ entry points all take those two lists (the Triton kernel
    takes the plan itself). The C++ extension lists the same names once (``LLMBIN_PLAN_TENSORS``
    and ``LLMBIN_PLAN_INTS`` in ``packed_matmul_cpu.cpp``) and exports them; ``cpu.extension``
    refuses a build whose list differs from :data:`PLAN_TENSORS` and :data:`PLAN_INTS`.
    A plan is immutable (``dataclasses.replace`` makes a changed copy), so those lists are made once.
    """

    out_features: int  # N
    in_features: int  # K
    group_size: int  # columns per coefficient group; >= K means one group per row
    n_bit_products: int  # products with a non-empty plane set (the first n_bit_products of coef)
    planes: torch.Tensor  # uint8 (P, N, row_bytes), the checkpoint's own planes (not copied)
    tiles: torch.Tensor  # uint8 (P, ceil(N / 16), row_bytes / 8, 128): the same bits for table lookup
    colw: torch.Tensor  # float32 (V, row_bytes * 8), zero past K
    prod_var: torch.Tensor  # int32 (NP,) which colw row each product uses
    prod_mono: torch.Tensor  # int32 (NP,) plane-set bit mask; products with mask 0 come last
    coef: torch.Tensor  # float32 (NP, ceil(N / 16), G, 16): tile-major, rows past N zero; coef_by_row() is (NP, N, G)
    # Salient corrections (all empty when there is no salient part), in one of three forms:
    # deltas: sal_rowptr (N + 1,) CSR over rows, sal_val float32 deltas, sal_row empty;
    # codes: sal_rowptr (2N + 1,): row r's b = 1 entries, then its b = 0 entries; sal_val uint8
    # magnitudes; sal_row float32 (N, 4): (scale, base) of the b = 1 part, then of the b = 0 part;
    # stream: sal_rowptr (N, 3): per row, the first nibble code whose position reaches the row, the
    # position before it and the marks before it; sal_col the checkpoint's nibble-gap stream (uint8),
    # sal_val its magnitude bit planes (uint8 (bits, bytes)); sal_row as in codes.
    sal_rowptr: torch.Tensor  # int64
    sal_col: torch.Tensor  # int16 (S,), or int32 when K > 32767; uint8 stream
    sal_val: torch.Tensor  # float32 or uint8 (S,); uint8 planes
    sal_row: torch.Tensor  # float32 (N, 4) or empty

    def __post_init__(self) -> None:
        # Every call of a layer passes them: built once, here (a frozen plan cannot go stale).
        object.__setattr__(self, "_op_args", (_tensors_of(self), _ints_of(self)))

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K): the dense weight's shape."""
        return self.out_features, self.in_features

    @property
    def salient_stream(self) -> bool:
        return self.sal_rowptr.dim() == 2

    @property
    def num_groups(self) -> int:
        return self.coef.shape[2]

    def coef_by_row(self) -> torch.Tensor:
        """The coefficients as ``coef[k, r, g]`` of the formula, (NP, N, G) (a copy: for checks and lowering, not kernels)."""
        NP, NT, G, _ = self.coef.shape
        return self.coef.transpose(2, 3).reshape(NP, NT * 16, G)[:, : self.out_features]

    def op_args(self) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
        """``(tensors, integers)``: the plan as ``llmbin::packed_linear`` and the C++ entry points
        take it after ``x``, in the order of :data:`PLAN_TENSORS` and :data:`PLAN_INTS`."""
        return self._op_args

    @classmethod
    def from_op_args(cls, tensors, ints) -> "KernelPlan":
        """The plan that :meth:`op_args` gave ``(tensors, ints)`` for."""
        return cls(**dict(zip(PLAN_TENSORS, tensors, strict=True)), **dict(zip(PLAN_INTS, ints, strict=True)))

    def nbytes(self) -> int:
        """Memory the plan adds on top of the checkpoint's tensors (its planes; in the stream form, its salient streams)."""
        shared = {"planes"} | ({"sal_col", "sal_val"} if self.salient_stream else set())
        return sum(getattr(self, name).nbytes for name in PLAN_TENSORS if name not in shared)


# The plan's tensor fields and integer fields, each in declaration order: the two lists of op_args().
PLAN_TENSORS = tuple(f.name for f in dataclasses.fields(KernelPlan) if f.type == "torch.Tensor")
PLAN_INTS = tuple(f.name for f in dataclasses.fields(KernelPlan) if f.type == "int")
if len(PLAN_TENSORS) + len(PLAN_INTS) != len(dataclasses.fields(KernelPlan)):
    raise TypeError("every KernelPlan field must be a torch.Tensor or an int: the kernels take those two lists")
_tensors_of, _ints_of = operator.attrgetter(*PLAN_TENSORS), operator.attrgetter(*PLAN_INTS)


def tile_planes(planes: torch.Tensor) -> torch.Tensor:
    """The planes re-laid out for the CPU table-lookup kernel: 16-row tiles of 4-bit column groups.

    Per plane, tile of rows 16t..16t+15 and 64-column word w, 128 bytes in four 32-byte steps;
    step s covers column groups j = 4s..4s+3 of the word (columns 4j..4j+3, bit i = column 4j+i).
    Byte i < 16 of a step holds row 16t+i's nibbles of groups 4s (low) and 4s+2 (high), byte 16+i
    those of groups 4s+1 and 4s+3: the two 16-byte lanes of a vpshufb use two different tables.
    Rows past N are zero.
    """
    P, N, row_bytes = planes.shape
    NT, W = -(-N // 16), row_bytes // 8
    padded = torch.zeros(P, NT * 16, row_bytes, dtype=torch.uint8, device=planes.device)
    padded[:, :N] = planes
    nib = torch.stack((padded & 0x0F, padded >> 4), dim=-1)  # (P, rows, bytes, 2): group 2·byte + half
    nib = nib.view(P, NT, 16, W, 4, 4)  # (P, tile, row, word, step, group in step)
    lanes = torch.stack((nib[..., 0] | nib[..., 2] << 4, nib[..., 1] | nib[..., 3] << 4), dim=-1)
    return lanes.permute(0, 1, 3, 4, 5, 2).reshape(P, NT, W, 128).contiguous()


def tile_coef(coef: torch.Tensor) -> torch.Tensor:
    """(NP, N, G) coefficients in the kernels' tile-major layout, (NP, ceil(N / 16), G, 16): the table-lookup
    loop scales a 16-row tile's group sums with one contiguous 64-byte load, and a row's coefficients are
    16 floats apart. Rows past N are zero."""
    NP, N, G = coef.shape
    NT = -(-N // 16)
    padded = torch.zeros(NP, NT * 16, G, dtype=coef.dtype, device=coef.device)
    padded[:, :N] = coef
    return padded.view(NP, NT, 16, G).transpose(2, 3).contiguous()


def _class_factors(pw: PackedWeight) -> list[tuple[str, Poly]]:
    """For each class: (column factor, plane polynomial) whose product is the class indicator."""
    has_cp, has_cm = pw.class_plane is not None, pw.column_mask is not None
    out = []
    for c in range(pw.num_classes):
        if has_cm and c == pw.num_classes - 1:
            out.append(("mask", {0: 1.0}))
        else:
            col = "unmasked" if has_cm else "all"
            if has_cp:
                q = 1 << pw.class_plane
                out.append((col, {q: 1.0} if c == 1 else {0: 1.0, q: -1.0}))
            else:
                out.append((col, {0: 1.0}))
    return out


def build_plan(pw: PackedWeight, *, tiles: bool = True, salient_stream: bool = False) -> KernelPlan:
    """The plan of ``pw``. ``tiles``: include the table-lookup re-layout (as big as the planes; only
    the CPU's small-batch path reads it). ``salient_stream``: PB-LLM's salient part in the stream
    form (nothing copied) rather than as lists, where the layout allows."""
    N, K = pw.shape
    row_bytes = pw.planes.shape[-1]
    Kpad = row_bytes * 8
    G = -(-K // pw.group_size)
    device = pw.planes.device
    classes = _class_factors(pw)
    column_mask = unpack_bits(pw.column_mask, K).float() if pw.column_mask is not None else None

    variants: dict[tuple[str, int], int] = {}
    colw_rows: list[torch.Tensor] = []

    def variant(col: str, term: int) -> int:
        key = (col, term if pw.col_scale is not None else -1)
        if key not in variants:
            w = torch.ones(K, device=device)
            if col == "mask":
                w = column_mask.clone()
            elif col == "unmasked":
                w = 1.0 - column_mask
            if key[1] >= 0:
                w = w * pw.col_scale[term].float()
            variants[key] = len(colw_rows)
            colw_rows.append(w)
        return variants[key]

    acc: dict[tuple[int, int], torch.Tensor] = {}

    def add(var: int, poly: Poly, scale: torch.Tensor) -> None:
        for mono, c in poly.items():
            key = (var, mono)
            acc[key] = acc.get(key, 0) + c * scale.float()

    for t, (p, c) in enumerate(pw.terms):
        col, poly = classes[c]
        add(variant(col, t), _mul(poly, {1 << p: 2.0, 0: -1.0}), pw.term_alpha(t))
    for m, c in enumerate(pw.means):
        col, poly = classes[c]
        add(variant(col, -1), poly, pw.mu[m])

    keys = sorted(acc, key=lambda k: (k[1] == 0, k))  # bit products first, constants last
    n_bit = sum(1 for _, mono in keys if mono)
    colw = torch.zeros(len(colw_rows), Kpad, device=device)
    if colw_rows:
        colw[:, :K] = torch.stack(colw_rows)
    coef = torch.stack([acc[k] for k in keys]) if keys else torch.zeros(0, N, G, device=device)
    empty = functools.partial(torch.zeros, device=device)
    plan = KernelPlan(out_features=N, in_features=K, group_size=pw.group_size, n_bit_products=n_bit, planes=pw.planes,
                      tiles=tile_planes(pw.planes) if tiles else empty(0, dtype=torch.uint8), colw=colw,
                      prod_var=torch.tensor([v for v, _ in keys], dtype=torch.int32, device=device),
                      prod_mono=torch.tensor([m for _, m in keys], dtype=torch.int32, device=device),
                      coef=tile_coef(coef), sal_rowptr=empty(0, dtype=torch.int64), sal_col=empty(0, dtype=torch.int16),
                      sal_val=empty(0), sal_row=empty(0, 4))
    if pw.salient is not None:
        stream = salient_stream and pw.salient.encoding == NIBBLE_GAP and _salient_codes_fit(plan, pw)
        plan = _with_salient_stream(plan, pw) if stream else _with_salient(plan, pw)
    return plan


def _salient_rows(plan: KernelPlan, pw: PackedWeight) -> torch.Tensor:
    """(N, 4) float32: (scale, base) of each row's b = 1 salient part, then of its b = 0 part.
    The formula there is ``slope · b + offset``; the salient weight is ``(2b − 1) · m · scale``."""
    coef = plan.coef_by_row()
    slope = coef[: plan.n_bit_products, :, 0].sum(0)
    offset = coef[plan.n_bit_products:, :, 0].sum(0)
    scale = pw.salient.scale.float()
    return torch.stack((scale, -(slope + offset), -scale, -offset), dim=1).contiguous()


def _with_salient_stream(plan: KernelPlan, pw: PackedWeight) -> KernelPlan:
    N, K = pw.shape
    s = pw.salient
    codes = torch.stack((s.positions & 15, s.positions >> 4), dim=1).flatten().to(torch.int64)
    after = torch.cumsum(torch.where(codes == 0, NIBBLE_MAX_GAP, codes), 0) - 1  # position after each code
    marks = torch.cumsum(codes != 0, 0)
    first = torch.searchsorted(after, torch.arange(N, device=after.device) * K)  # first code reaching each row
    before = torch.where(first > 0, after[(first - 1).clamp_min(0)], -1)
    marked = torch.where(first > 0, marks[(first - 1).clamp_min(0)], 0)
    index = torch.stack((first, before, marked), dim=1).contiguous()
    return dataclasses.replace(plan, sal_rowptr=index, sal_col=s.positions.contiguous(),
                               sal_val=s.magnitudes.contiguous(), sal_row=_salient_rows(plan, pw))


def _with_salient(plan: KernelPlan, pw: PackedWeight) -> KernelPlan:
    N, K = pw.shape
    s = pw.salient
    pos = decode_positions(s.encoding, s.positions, (N, K))  # row-major order, so already CSR-sorted
    rows, cols = pos // K, pos % K
    col_dtype = torch.int16 if K <= 32767 else torch.int32
    if _salient_codes_fit(plan, pw):
        bit = unpack_bits(plan.planes[0], K).view(-1)[pos].long()  # the salient sign, and the formula's bit
        part = 2 * rows + 1 - bit  # per row: b = 1 entries, then b = 0
        order = torch.argsort(part, stable=True)
        rowptr = torch.zeros(2 * N + 1, dtype=torch.int64, device=pos.device)
        rowptr[1:] = torch.bincount(part, minlength=2 * N).cumsum(0)
        mags = unpack_codes(s.magnitudes, s.count).to(torch.uint8)
        return dataclasses.replace(plan, sal_rowptr=rowptr, sal_col=cols[order].to(col_dtype), sal_val=mags[order],
                                   sal_row=_salient_rows(plan, pw))
    exact = pw.decode(torch.float32).view(-1)[pos]
    formula = plan_decode(plan).view(-1)[pos]  # the plan has no salient part yet
    rowptr = torch.zeros(N + 1, dtype=torch.int64, device=pos.device)
    rowptr[1:] = torch.bincount(rows, minlength=N).cumsum(0)
    return dataclasses.replace(plan, sal_rowptr=rowptr, sal_col=cols.to(col_dtype), sal_val=exact - formula)


def _salient_codes_fit(plan: KernelPlan, pw: PackedWeight) -> bool:
    """Whether the formula at a salient position is a function of its row and plane-0 bit only
    (PB-LLM's layout), and magnitudes fit a byte."""
    K = plan.shape[1]
    return (plan.planes.shape[0] == 1 and plan.num_groups == 1 and pw.salient.bits <= 9
            and bool((plan.colw[:, :K] == 1).all()))


def plan_decode(plan: KernelPlan, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense ``(N, K)`` weight a plan describes (plain torch)."""
    N, K = plan.shape
    bits = unpack_bits(plan.planes, K).to(dtype)
    W = torch.zeros(N, K, dtype=dtype, device=plan.planes.device)
    by_row = plan.coef_by_row()
    for k in range(by_row.shape[0]):
        mono, var = int(plan.prod_mono[k]), int(plan.prod_var[k])
        prod = torch.ones(N, K, dtype=dtype, device=W.device)
        for p in range(bits.shape[0]):
            if mono >> p & 1:
                prod = prod * bits[p]
        coef = by_row[k].to(dtype).repeat_interleave(plan.group_size, dim=-1)[:, :K]
        W = W + coef * plan.colw[var, :K].to(dtype) * prod
    if plan.salient_stream:
        pos = decode_positions(NIBBLE_GAP, plan.sal_col, (N, K))
        rows, cols = pos // K, pos % K
        bit = unpack_bits(plan.planes[0], K)[rows, cols]
        mags = unpack_codes(plan.sal_val, pos.numel()).to(dtype)
        part = torch.where(bit, 0, 2)
        W[rows, cols] += plan.sal_row.to(dtype)[rows, part] * mags + plan.sal_row.to(dtype)[rows, part + 1]
    elif plan.sal_row.numel():  # codes: 2N segments, (scale, base) each
        seg = torch.repeat_interleave(torch.arange(2 * N, device=W.device), plan.sal_rowptr.diff())
        scale_base = plan.sal_row.to(dtype).view(2 * N, 2)[seg]
        W[seg // 2, plan.sal_col.long()] += scale_base[:, 0] * plan.sal_val.to(dtype) + scale_base[:, 1]
    elif plan.sal_rowptr.numel():
        rows = torch.repeat_interleave(torch.arange(N, device=W.device), plan.sal_rowptr.diff())
        W[rows, plan.sal_col.long()] += plan.sal_val.to(dtype)
    return W
