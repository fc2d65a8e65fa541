import pytest
import torch

from llmbin.packing.packed_weight import PackedWeight


def _example(seed=0, N=9, K=77, planes=1, group=None, salient=True):
    g = torch.Generator().manual_seed(seed)
    group = group or K
    G = -(-K // group)
    bits = torch.rand(planes, N, K, generator=g) > 0.5
    alpha = torch.rand(planes, N, G, generator=g)
    mu = torch.randn(N, G, generator=g)
    mask = torch.rand(N, K, generator=g) < 0.15 if salient else None
    mags = torch.randint(0, 128, (N, K), generator=g) if salient else None
    scale = torch.rand(N, generator=g) if salient else None
    return PackedWeight.from_codes(bits, alpha, mu[None], group, salient_mask=mask, salient_mag=mags, salient_scale=scale), bits, alpha, mu, mask, mags, scale


@pytest.mark.parametrize("planes,group", [(1, None), (2, None), (1, 16), (2, 32)])
def test_decode_matches_the_documented_formula(planes, group):
    pw, bits, alpha, mu, mask, mags, scale = _example(planes=planes, group=group)
    K, gs = bits.shape[-1], pw.group_size
    cols = torch.arange(K) // gs
    a, m = alpha.half().double()[:, :, cols], mu.half().double()[:, cols]
    expected = m + (a * (bits.double() * 2 - 1)).sum(0)
    salient_value = (bits[0].double() * 2 - 1) * mags.double() * scale.half().double()[:, None]
    expected = torch.where(mask, salient_value, expected)
    assert torch.allclose(pw.decode(torch.float64), expected, rtol=0, atol=1e-12)


def test_tensors_round_trip_through_metadata():
    pw = _example()[0]
    back = PackedWeight.from_tensors(pw.tensors("layer"), "layer", pw.metadata())
    assert torch.equal(back.decode(), pw.decode())


def test_tampered_shapes_and_counts_are_detected():
    pw = _example()[0]
    meta = pw.metadata()
    bad = dict(meta, shape=[meta["shape"][0] + 1, meta["shape"][1]])
    with pytest.raises(ValueError, match="expected"):
        PackedWeight.from_tensors(pw.tensors("l"), "l", bad)
    bad = dict(meta, salient=dict(meta["salient"], count=meta["salient"]["count"] - 1))
    with pytest.raises(ValueError, match="salient"):
        PackedWeight.from_tensors(pw.tensors("l"), "l", bad)


def test_storage_bits_counts_every_tensor():
    pw = _example(salient=False, N=4, K=128)[0]
    # 4 rows x 128 sign bits + 4 fp16 alphas + 4 fp16 means
    assert pw.storage_bits() == 4 * 128 + 4 * 16 + 4 * 16
