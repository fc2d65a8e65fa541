"""The lowering to bit products describes exactly the weight ``PackedWeight.decode`` gives."""
import pytest
import torch

from llmbin.kernels.plan import build_plan, plan_decode, tile_planes
from llmbin.registry import available_methods, make_config, method_function
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
    from llmbin.packing.bitpack import unpack_bits

    pw = random_packed("billm", N, K, 64)
    tiles = tile_planes(pw.planes)
    assert tiles.shape == (2, -(-N // 16), pw.planes.shape[-1] // 8, 128)
    assert torch.equal(_untile(tiles, N)[..., :K], unpack_bits(pw.planes, K).bool())
    assert not _untile(tiles, N)[..., K:].any()


def test_products_expand_signs_and_classes_into_plane_monomials():
    plan = build_plan(random_packed("sign+mean", 3, 70, 70))
    assert plan.prod_mono.tolist() == [1, 0] and plan.n_bit_products == 1  # 2αb, then (μ − α)·1
    torch.testing.assert_close(plan.coef[0], 2 * random_packed("sign+mean", 3, 70, 70).alpha[0].float())
    billm = build_plan(random_packed("billm", 3, 70, 64))
    # planes 0 and 1 and their product, in the unmasked columns and the masked ones; no negated literals
    assert sorted(set(billm.prod_mono.tolist())) == [0, 1, 2, 3] and billm.colw.shape[0] == 2


def test_salient_corrections_sit_at_the_salient_positions():
    pw = random_packed("pb-llm", 5, 100, 100)
    plan = build_plan(pw)
    assert plan.sal_rowptr[-1] == pw.salient.count == plan.sal_col.numel() == plan.sal_val.numel()
    assert plan.sal_col.dtype == torch.int16  # 6 bytes per salient weight
    rows = torch.repeat_interleave(torch.arange(5), plan.sal_rowptr.diff())
    assert not torch.equal(pw.decode(), plan_decode(build_plan(random_packed("sign+mean", 5, 100, 100))))
    torch.testing.assert_close(plan_decode(plan)[rows, plan.sal_col.long()], pw.decode()[rows, plan.sal_col.long()])
    without = build_plan(random_packed("sign+mean", 5, 100, 100))
    assert without.sal_rowptr.numel() == 0
