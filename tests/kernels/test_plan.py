"""The lowering to bit products describes exactly the weight ``PackedWeight.decode`` gives."""
import pytest
import torch

from llmbin.config import available_methods, make_config
from llmbin.kernels.plan import build_plan, plan_decode, tile_coef, tile_planes
from llmbin.packing.bitpack import unpack_bits
from llmbin.packing.packed_weight import PackedWeight
from llmbin.registry import method_function
from tests.kernels.conftest import LAYOUTS, SHAPES, random_packed


@pytest.mark.parametrize("layout", LAYOUTS)
def test_plan_decodes_to_the_reference_weight(layout):
    for i, (N, K, gs) in enumerate(SHAPES):
        pw = random_packed(layout, N, K, gs, seed=i)
        torch.testing.assert_close(plan_decode(build_plan(pw), torch.float64), pw.decode(torch.float64),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", available_methods())
def test_every_method_lowers_exactly(method):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 80, generator=g) * torch.linspace(0.2, 3.0, 80)
    W, H = torch.randn(24, 80, generator=g) * 0.05, 2 * X.T @ X / 512
    options = {"blocksize": 32} if method in ("billm", "arb-x", "arb-rc") else {}
    config = make_config(method, **options)
    pw = method_function(config)(W, H, config)
    torch.testing.assert_close(plan_decode(build_plan(pw), torch.float64), pw.decode(torch.float64),
                               rtol=0, atol=1e-6)


def _untile(tiles: torch.Tensor, N: int) -> torch.Tensor:
    """Bits (P, N, 64 · words) read back from the tile layout ``tile_planes`` documents."""
    P, NT, W, _ = tiles.shape
    steps = tiles.view(P, NT, W, 4, 2, 16).long()  # (plane, tile, word, step, lane, row)
    bits = torch.zeros(P, NT * 16, W * 64, dtype=torch.bool)
    for s in range(4):
        for lane in range(2):
            for half in range(2):  # low nibble: group 4s + lane, high nibble: group 4s + 2 + lane
                nib = (steps[:, :, :, s, lane] >> (4 * half)) & 0xF  # (plane, tile, word, row)
                group = 4 * s + lane + 2 * half
                for i in range(4):
                    col = torch.arange(W) * 64 + 4 * group + i
                    bits[:, :, col] = ((nib >> i) & 1).bool().permute(0, 1, 3, 2).reshape(P, NT * 16, W)
    return bits[:, :N]


@pytest.mark.parametrize("N, K", [(1, 63), (3, 65), (17, 130), (40, 256)])
def test_tiles_hold_exactly_the_planes_bits(N, K):
    pw = random_packed("billm", N, K, 64)
    tiles = tile_planes(pw.planes)
    assert tiles.shape == (2, -(-N // 16), pw.planes.shape[-1] // 8, 128)
    assert torch.equal(_untile(tiles, N)[..., :K], unpack_bits(pw.planes, K).bool())
    assert not _untile(tiles, N)[..., K:].any()


@pytest.mark.parametrize("N", [1, 16, 37])
def test_coefficients_are_tile_major_with_zero_rows_past_n(N):
    # the table-lookup loop reads a 16-row tile's coefficients of one group as one 64-byte vector
    coef = torch.randn(3, N, 5)
    tiled = tile_coef(coef)
    assert tiled.shape == (3, -(-N // 16), 5, 16) and tiled.is_contiguous()
    for r in range(N):
        assert torch.equal(tiled[:, r // 16, :, r % 16], coef[:, r])
    assert not tiled.transpose(2, 3).reshape(3, -1, 5)[:, N:].any()
    plan = build_plan(random_packed("dual (db-llm)", N, 70, 64))
    assert plan.coef.shape == (plan.coef.shape[0], -(-N // 16), 2, 16)
    assert torch.equal(tile_coef(plan.coef_by_row()), plan.coef)


def test_products_expand_signs_and_classes_into_plane_monomials():
    plan = build_plan(random_packed("sign+mean", 3, 70, 70))
    assert plan.prod_mono.tolist() == [1, 0] and plan.n_bit_products == 1  # 2αb, then (μ − α)·1
    torch.testing.assert_close(plan.coef_by_row()[0], 2 * random_packed("sign+mean", 3, 70, 70).alpha[0].float())
    billm = build_plan(random_packed("billm", 3, 70, 64))
    # planes 0 and 1 and their product, in the unmasked columns and the masked ones; no negated literals
    assert sorted(set(billm.prod_mono.tolist())) == [0, 1, 2, 3] and billm.colw.shape[0] == 2


def _salient_rows(plan) -> torch.Tensor:
    lists = plan.sal_rowptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(lists), plan.sal_rowptr.diff())
    return rows // 2 if plan.sal_row.numel() else rows


@pytest.mark.parametrize("group_size, form", [(100, "codes"), (64, "deltas")])
def test_salient_corrections_sit_at_the_salient_positions(group_size, form):
    pw = random_packed("pb-llm", 5, 100, group_size)
    plan = build_plan(pw)
    assert plan.sal_rowptr[-1] == pw.salient.count == plan.sal_col.numel() == plan.sal_val.numel()
    assert plan.sal_col.dtype == torch.int16
    if form == "codes":  # one plane, one group per row: column and magnitude, 3 bytes per salient weight
        assert plan.sal_val.dtype == torch.uint8 and plan.sal_row.shape == (5, 4) and plan.sal_rowptr.numel() == 11
        bits = unpack_bits(pw.planes[0], 100).bool()
        for r in range(5):  # each row: its b = 1 entries, then its b = 0 entries
            a, m, e = plan.sal_rowptr[2 * r: 2 * r + 3].tolist()
            assert bits[r, plan.sal_col[a:m].long()].all() and not bits[r, plan.sal_col[m:e].long()].any()
    else:  # groups: the formula varies along the row, so deltas stay float32
        assert plan.sal_val.dtype == torch.float32 and plan.sal_row.numel() == 0 and plan.sal_rowptr.numel() == 6
    rows, cols = _salient_rows(plan), plan.sal_col.long()
    assert torch.equal(torch.sort(rows * 100 + cols).values, torch.sort(rows * 100 + cols).values.unique())
    assert not torch.equal(pw.decode(), plan_decode(build_plan(random_packed("sign+mean", 5, 100, group_size))))
    torch.testing.assert_close(plan_decode(plan)[rows, cols], pw.decode()[rows, cols])
    without = build_plan(random_packed("sign+mean", 5, 100, group_size))
    assert without.sal_rowptr.numel() == 0 and without.sal_row.numel() == 0


def test_the_light_plan_copies_nothing_of_the_salient_part():
    pw = random_packed("pb-llm", 64, 300, 300)
    full, light = build_plan(pw), build_plan(pw, tiles=False, salient_stream=True)
    torch.testing.assert_close(plan_decode(light, torch.float64), pw.decode(torch.float64), rtol=0, atol=1e-6)
    assert light.nbytes() <= 60 * 64 + 4 * 320  # a few words per row and per column, nothing per weight
    assert full.nbytes() > 3 * pw.salient.count + full.tiles.numel()  # lists of 3 bytes per salient weight, tiles
    g = torch.Generator().manual_seed(1)
    dense = PackedWeight.from_codes(torch.rand(1, 8, 40, generator=g) < 0.5, torch.rand(1, 8, 1), torch.rand(1, 8, 1), 40,
                                    salient_mask=torch.rand(8, 40, generator=g) < 0.5,
                                    salient_mag=torch.randint(0, 128, (8, 40), generator=g), salient_scale=torch.rand(8))
    assert dense.salient.encoding == "bitmap"  # a dense mask is stored as a bitmap: no stream to read, lists instead
    plan = build_plan(dense, salient_stream=True)
    assert not plan.salient_stream
    torch.testing.assert_close(plan_decode(plan, torch.float64), dense.decode(torch.float64), rtol=0, atol=1e-6)
