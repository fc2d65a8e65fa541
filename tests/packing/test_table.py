"""Quantized tables (the output matrix and embedding in 8 or 4 bits): codes within half a step of
each weight, nibbles that round-trip, every stored byte counted, a damaged table named."""
import pytest
import torch

from llmbin.packing.table import QuantTable, _pack_nibbles, _unpack_nibbles


@pytest.mark.parametrize("bits, group", [(8, 64), (8, 32), (4, 32), (4, 64)])
@pytest.mark.parametrize("K", [64, 100, 129])  # whole groups, a ragged last group, an odd width
def test_each_weight_is_within_half_a_step_unless_clipped(bits, group, K):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(37, K, generator=g) * torch.rand(37, 1, generator=g)
    W[3] = 0.0  # an all-zero row keeps zero codes
    table = QuantTable.quantize(W, bits, group)
    assert table.dense().shape == (37, K) and torch.equal(table.dense()[3], torch.zeros(K))
    step = table.scale.float().repeat_interleave(group, dim=1)[:, :K]
    err = (table.dense() - W).abs()
    limit = 127 if bits == 8 else 7
    inside = W.abs() <= limit * step  # 4-bit scales may clip the largest value of a group a little
    assert (err[inside] <= step[inside] / 2 + 1e-6).all()
    if bits == 8:
        assert inside.all()
    other = QuantTable.quantize(W, bits, group)
    assert torch.equal(other.codes, table.codes) and torch.equal(other.scale, table.scale)  # deterministic


def test_four_bit_scale_search_has_no_more_error_than_absmax():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 256, generator=g)
    searched = QuantTable.quantize(W, 4, 64)
    absmax = (W.view(64, 4, 64).abs().amax(-1) / 7).half().float()
    plain = torch.clamp(torch.round(W.view(64, 4, 64) / absmax[..., None]), -8, 7) * absmax[..., None]
    assert ((searched.dense() - W) ** 2).sum() < ((plain.view(64, 256) - W) ** 2).sum()


def test_nibbles_round_trip_in_column_order():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 1)[:, :15]  # 15 columns: a padded last byte
    packed = _pack_nibbles(codes)
    assert packed.shape == (3, 8) and packed.dtype == torch.uint8
    assert packed[0, 0].item() == (0 | (1 << 4))  # columns 0 and 1 (codes −8, −7) in the low and high nibble
    assert torch.equal(_unpack_nibbles(packed, 15), codes)


def test_storage_bits_count_every_byte():
    table = QuantTable.quantize(torch.randn(10, 100), 4, 32)
    assert table.codes.shape == (10, 50) and table.scale.shape == (10, 4)
    assert table.storage_bits() == 8 * (10 * 50) + 16 * (10 * 4)
    assert QuantTable.quantize(torch.randn(10, 100), 8, 50).storage_bits() == 8 * 1000 + 16 * 20


def test_a_stored_table_reads_back_and_a_damaged_one_is_named():
    table = QuantTable.quantize(torch.randn(6, 40), 4, 8)
    again = QuantTable.from_tensors(table.tensors(), table.metadata())
    assert torch.equal(again.dense(), table.dense())
    with pytest.raises(ValueError, match=r"weight is torch.uint8 \(6, 19\), a 4-bit 6 x 40 table stores torch.uint8 \(6, 20\)"):
        QuantTable.from_tensors({**table.tensors(), "weight": table.codes[:, :19]}, table.metadata())
    with pytest.raises(ValueError, match="weight_scale is torch.float32"):
        QuantTable.from_tensors({**table.tensors(), "weight_scale": table.scale.float()}, table.metadata())
    with pytest.raises(ValueError, match="a table has 8 or 4 bits, not 3"):
        QuantTable.from_tensors(table.tensors(), {**table.metadata(), "bits": 3})
    with pytest.raises(ValueError, match="needs weight and weight_scale"):
        QuantTable.from_tensors({"weight": table.codes}, table.metadata())
