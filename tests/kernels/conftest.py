"""Random packed weights in every layout the format has, at awkward shapes."""
import torch

from llmbin.packing.packed_weight import PackedWeight

# name -> (planes, terms, means, class_plane, column_mask, col_scale, pow2, salient)
LAYOUTS = {
    "sign": (1, [(0, 0)], [], None, False, False, False, False),
    "sign+mean": (1, [(0, 0)], [0], None, False, False, False, False),
    "pb-llm": (1, [(0, 0)], [0], None, False, False, False, True),
    "dual (db-llm)": (2, [(0, 0), (1, 0)], [0], None, False, False, False, False),
    "pow2 3-bit (gptq)": (3, [(0, 0), (1, 0), (2, 0)], [0], None, False, False, True, False),
    "billm": (2, [(0, 0), (0, 1), (0, 2), (1, 2)], [0, 1, 2], 1, True, False, False, False),
    "arb-rc": (2, [(0, 0), (0, 1), (0, 2), (1, 2)], [0, 1, 2], 1, True, True, False, False),
    "class plane only": (2, [(0, 0), (0, 1)], [1], 1, False, False, False, False),
    "column mask only": (1, [(0, 0), (0, 1)], [0, 1], None, True, False, False, False),
}
# (N, K, group_size): K off the 64-bit word size, N = 1 and 3, groups of whole words, one
# group per row, and groups that split words (those run the scalar path).
SHAPES = [(1, 63, 63), (3, 65, 64), (3, 200, 128), (40, 96, 48), (17, 130, 200), (8, 256, 64)]


def random_packed(layout: str, N: int, K: int, group_size: int, seed: int = 0) -> PackedWeight:
    P, terms, means, class_plane, has_mask, has_col, pow2, salient = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    G = -(-K // group_size)
    bits = torch.rand(P, N, K, generator=g) < 0.5
    alpha = torch.rand(1 if pow2 else len(terms), N, G, generator=g) + 0.1
    mu = torch.randn(len(means), N, G, generator=g) * 0.3 if means else None
    extra = {}
    if has_mask:
        extra["column_mask"] = torch.rand(K, generator=g) < 0.25
    if has_col:
        extra["col_scale"] = torch.rand(len(terms), K, generator=g) + 0.5
    if salient:
        extra.update(salient_mask=torch.rand(N, K, generator=g) < 0.1,
                     salient_mag=torch.randint(0, 128, (N, K), generator=g),
                     salient_scale=torch.rand(N, generator=g) * 0.01)
    return PackedWeight.from_codes(bits, alpha, mu, group_size, terms=terms, means=means, class_plane=class_plane,
                                   pow2_planes=pow2, **extra)


# Relative error (of Σ|x|·|w|) of exact fp32 paths, and of the table-lookup path: its int16
# tables are rounded to 1/4095 of each 64 columns' largest entry.
FP32_TOL, LUT_TOL = 2e-5, 5e-4


def assert_matches_reference(y: torch.Tensor, x: torch.Tensor, pw: PackedWeight, tol: float = FP32_TOL) -> None:
    """Within ``tol`` of the float64 reference, scaled per output by Σ|x|·|w|."""
    W = pw.decode(torch.float64)
    ref = x.double() @ W.T
    scale = x.double().abs() @ W.abs().T + 1e-12
    assert torch.isfinite(y).all(), "the kernel left outputs unwritten or produced non-finite values"
    err = ((y.double() - ref).abs() / scale).max().item()
    assert err < tol, f"relative error {err:.2e}"
